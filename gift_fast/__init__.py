"""gift-fast: continual fine-tuning of CLIP with synthetic replay (GIFT), fast.

Pipeline stages, one place each (the README's "Layout" has the whole map):
  synthesize  -> gift_fast.synth (prompts, generators, engine); per task in a run: gift_fast.replay
  distill     -> gift_fast.losses        (fused kernel: gift_fast.kernels.contrastive_distill); gift_fast.teacher
  consolidate -> gift_fast.awc           (fused kernel: gift_fast.kernels.awc)
  train       -> gift_fast.train         (the loop; its parts: method, run_config, schedule, batches, step,
                                          run_folder; several runs: gift_fast.runs; CIL: gift_fast.cil_trainer)
  evaluate    -> gift_fast.evaluate
  report      -> gift_fast.report, gift_fast.metrics, gift_fast.paper
"""

__version__ = "0.1.0"
