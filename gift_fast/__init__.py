"""gift-fast: continual fine-tuning of CLIP with synthetic replay (GIFT), fast.

Pipeline stages, one module each:
  synthesize  -> gift_fast.synth
  distill     -> gift_fast.losses        (fused kernel: gift_fast.kernels.contrastive_distill)
  consolidate -> gift_fast.awc           (fused kernel: gift_fast.kernels.awc)
  train       -> gift_fast.train
  evaluate    -> gift_fast.evaluate
  report      -> gift_fast.report, gift_fast.metrics
"""

__version__ = "0.1.0"
