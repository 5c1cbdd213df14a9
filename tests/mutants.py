"""Plant single-line bugs one at a time and see whether the tests that should catch them do.

    python tests/mutants.py                 # every mutant, then a score table
    python tests/mutants.py --list          # what each mutant plants, and whether its pattern is found
    python tests/mutants.py --only NAME     # one mutant (repeat --only for several)

Not part of the pytest run (pytest collects ``test_*.py`` only). Each mutant is a text
substitution that must match exactly once in its file: a pattern that is not found (the
code moved) or found several times is reported as NOT FOUND / AMBIGUOUS, never as caught;
update the pattern then. The file is changed in place and restored in a ``finally`` block
(and from a backup outside the repository if this script was killed: the next start puts
it back first). Only a failing test run counts as caught; a mutant that makes the chosen
tests hang past the timeout is reported as caught (timeout), an unknown test id as an error.
Before the mutants, the chosen tests run once on the unchanged code: they must pass.
"""
from __future__ import annotations

import argparse
import hashlib
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
BACKUP_DIR = Path(tempfile.gettempdir()) / f"gift-fast-mutants-{hashlib.sha1(str(REPO).encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str                 # relative to the repository root
    old: str                  # must occur exactly once in the file
    new: str
    tests: Tuple[str, ...]    # pytest node ids that should fail with the mutant
    what: str                 # what the bug would do


T_PLUMB = "tests/test_train_plumbing.py"
MUTANTS: List[Mutant] = [
    # ---- the six bugs of the issue that passed the whole suite
    Mutant("schedule-over-all-steps", "gift_fast/schedule.py",
           "e, es = k - warmup, max(1, steps - warmup)", "e, es = k - warmup, max(1, steps)",
           (f"{T_PLUMB}::test_cosine_schedule_against_its_formula",
            f"{T_PLUMB}::test_the_trainers_learning_rate_follows_the_schedule"),
           "the cosine decays over `steps` instead of `steps - warmup`: a task ends at a non-zero lr"),
    Mutant("pool-has-current-task", "gift_fast/synth/prompts.py",
           "pools.append(list(pool))", "pools.append(list(pool) + src.prompts())",
           (f"{T_PLUMB}::test_on_the_fly_prompts_are_the_engines_and_leave_out_the_task_being_learned",),
           "the replay (on-the-fly and `synth`: one pool function) draws prompts of the task being learned"),
    Mutant("on-the-fly-pool-after-the-task", "gift_fast/replay.py",
           "seed=self.seed)[t]", "seed=self.seed)[min(t + 1, len(self.tasks) - 1)]",
           (f"{T_PLUMB}::test_on_the_fly_prompts_are_the_engines_and_leave_out_the_task_being_learned",),
           "on-the-fly training takes the pool after the task (its own classes in it), unlike `synth`"),
    Mutant("resume-keeps-cpu-rng", "gift_fast/run_folder.py",
           'torch.set_rng_state(rest["rng"]["cpu"])', "pass",
           (f"{T_PLUMB}::test_in_task_resume_restores_the_cpu_rng_a_dropout_draw_depends_on",),
           "an in-task resume does not restore the CPU RNG: random draws differ from the uninterrupted run"),
    Mutant("fisher-not-reset", "gift_fast/train.py",
           "self.awc.reset_fisher()", "pass",
           (f"{T_PLUMB}::test_ewc_v_fisher_of_the_second_task_is_its_own",),
           "the static (EWC-V) Fisher of one task leaks into the next"),
    Mutant("iter-batches-one-permutation", "gift_fast/data/cache.py",
           "np.random.default_rng([seed, epoch])", "np.random.default_rng([seed, 0])",
           ("tests/test_cache.py::test_iter_batches_reshuffles_every_epoch_and_repeats_with_the_seed",),
           "the cached fast path sees a task in one fixed order every epoch"),
    Mutant("synth-resume-ignores-prompt", "gift_fast/synth/engine.py",
           'if not meta or meta.get("i") != i or meta.get("prompt") != prompts[i] or meta.get("fp") != fp:',
           'if not meta or meta.get("i") != i or meta.get("fp") != fp:',
           ("tests/test_synth_resume_prompts.py::test_resume_regenerates_images_of_another_prompt",),
           "a resumed synthesis keeps images made for other prompts"),
    # ---- losses
    Mutant("cd-without-tau-squared", "gift_fast/losses.py",
           "cd_image = tau * tau * soft_cross_entropy(S / tau, p_rows)",
           "cd_image = soft_cross_entropy(S / tau, p_rows)",
           ("tests/test_losses.py::test_reference_matches_method_float64",),
           "the image side of CD loses its tau^2 factor"),
    Mutant("ita-targets-not-normalized", "gift_fast/losses.py",
           "A = same / same.sum(dim=1, keepdim=True)", "A = same",
           ("tests/test_losses.py::test_reference_matches_method_float64",),
           "ITA's targets do not sum to 1 when prompts repeat"),
    Mutant("low-precision-loss-in-input-dtype", "gift_fast/losses.py",
           "return torch.promote_types(x.dtype, torch.float32)", "return x.dtype",
           ("tests/test_losses.py::test_low_precision_inputs_compute_in_float32",),
           "bf16 / fp16 embeddings give a loss computed in bf16 / fp16"),
    # ---- AWC (reference and Triton kernel)
    Mutant("awc-fisher-by-sum", "gift_fast/awc.py",
           "    mean = sq.mean()\n", "    mean = sq.sum()\n",
           ("tests/test_awc.py::test_matches_direct_evaluation_over_steps",),
           "the Fisher is normalized by sum(g^2) instead of mean(g^2)"),
    Mutant("awc-penalty-gradient-halved", "gift_fast/awc.py",
           "pen_grad = (2.0 * self.strength) * f * d", "pen_grad = self.strength * f * d",
           ("tests/test_awc.py::test_matches_direct_evaluation_over_steps",),
           "the penalty gradient misses the factor 2 of d/dp (p - a)^2"),
    Mutant("awc-static-not-a-running-mean", "gift_fast/awc.py",
           "decay = (self.num_fisher_updates / (self.num_fisher_updates + 1)",
           "decay = (1.0 / (self.num_fisher_updates + 1)",
           ("tests/test_awc.py::test_static_fisher_is_running_mean_then_frozen",),
           "EWC-V's static Fisher weighs its batches unequally"),
    Mutant("awc-state-dict-drops-anchors", "gift_fast/awc.py",
           'state = {f"anchor.{n}": t for n, t in self._anchor.items()}', "state = {}",
           ("tests/test_awc.py::test_state_dict_roundtrip",),
           "an in-task checkpoint loses the anchors: a resumed task pulls towards other weights"),
    Mutant("kernel-awc-overwrites-grad", "kernels/awc.py",
           "g_new = g_raw.to(tl.float32) + pen_grad", "g_new = pen_grad",
           ("tests/test_kernel_awc.py::test_adaptive_matches_reference_over_steps",),
           "the Triton AWC replaces the distillation gradient by the penalty gradient"),
    Mutant("kernel-awc-penalty-without-d", "kernels/awc.py",
           "tl.store(pen_ptr + pid, strength * tl.sum(fd * d, axis=0))",
           "tl.store(pen_ptr + pid, strength * tl.sum(fd, axis=0))",
           ("tests/test_kernel_awc.py::test_ddp_copies_reduced_grads_into_the_views",),
           "the Triton AWC reports sum F d instead of sum F d^2 as the penalty"),
    Mutant("kernel-cd-row-lse-without-tau", "kernels/contrastive_distill.py",
           "l2_r = tl.sum(tl.where(ok2, tl.exp(-d_r * inv_tau), 0.0), 1)",
           "l2_r = tl.sum(tl.where(ok2, tl.exp(-d_r), 0.0), 1)",
           ("tests/test_kernel_contrastive_distill.py::test_both_paths_every_mode",),
           "the fused CD kernel's row log-sum-exp forgets the temperature (small-B path)"),
    # ---- metrics, evaluation, report
    Mutant("transfer-includes-diagonal", "gift_fast/metrics.py",
           "transfer_cols = [float(a[:j, j].mean()) for j in range(1, T)]",
           "transfer_cols = [float(a[:j + 1, j].mean()) for j in range(1, T)]",
           ("tests/test_metrics.py",), "Transfer counts the accuracy right after learning a task"),
    Mutant("last-is-a-column", "gift_fast/metrics.py",
           '"last": float(a[T - 1].mean()),', '"last": float(a[:, T - 1].mean()),',
           ("tests/test_metrics.py",), "Last averages the last column instead of the last row"),
    Mutant("classifier-not-renormalized", "gift_fast/evaluate.py",
           "emb = emb.view(len(classnames), len(templates), -1).mean(dim=1)\n    return F.normalize(emb, dim=-1)",
           "emb = emb.view(len(classnames), len(templates), -1).mean(dim=1)\n    return emb",
           ("tests/test_evaluate.py",), "the zero-shot class embeddings are not normalized after the template mean"),
    Mutant("report-population-std", "gift_fast/report.py",
           "float(vals.std(ddof=1))", "float(vals.std())",
           ("tests/test_report.py::test_summary_and_per_task_tables_hold_the_metrics",),
           "the report's +- is the population, not the sample, standard deviation over seeds"),
    # ---- text, data, distributed, prompts, loop
    Mutant("trim-one-position-short", "gift_fast/text.py",
           "length = int(pooled_positions(model, tokens).max()) + 1",
           "length = int(pooled_positions(model, tokens).max())",
           ("tests/test_text.py",), "short prompts are cut before their end token: another position is pooled"),
    Mutant("synthetic-labels-per-image", "gift_fast/data/synthetic.py",
           "        labels.append(index[t])", "        labels.append(len(labels))",
           ("tests/test_train_synthetic.py::test_black_images_dropped_and_labels_are_distinct_prompt_ids",),
           "ITA treats two images of the same prompt as different classes"),
    Mutant("normalize-without-255", "gift_fast/data/cache.py",
           "return x.to(torch.float32).div_(255).sub_(m).div_(s)", "return x.to(torch.float32).sub_(m).div_(s)",
           ("tests/test_cache.py::test_normalize_is_totensor_plus_normalize",),
           "cached uint8 pixels are normalized without scaling to [0, 1]"),
    Mutant("rows-overlap", "gift_fast/distributed.py",
           "return slice(self.rank * per, (self.rank + 1) * per)",
           "return slice(self.rank * per, (self.rank + 1) * per + 1)",
           ("tests/test_distributed.py::test_rows_split_a_global_batch_into_equal_consecutive_shares",),
           "neighbouring processes share a row of every global batch"),
    Mutant("retry-seed-stride-missing", "gift_fast/synth/prompts.py",
           "return (base + attempt * RETRY_SEED_STRIDE) & _MASK63", "return (base + attempt) & _MASK63",
           ("tests/test_synth_prompts.py::test_retry_seeds_are_the_documented_next_seeds",),
           "a blacked-out image is retried with its neighbour's seed"),
    Mutant("synthetic-batches-keep-partial", "gift_fast/batches.py",
           "rows.append(perm[: n - n % batch_size])", "rows.append(perm)",
           ("tests/test_train.py::test_gift_steps_match_a_hand_written_step",),
           "synthetic batches straddle two epochs (an image can appear twice in a batch)"),
    Mutant("wise-alpha-swapped", "gift_fast/teacher.py",
           "out[k] = alpha * initial[k].to(v.device, v.dtype) + (1.0 - alpha) * v",
           "out[k] = (1.0 - alpha) * initial[k].to(v.device, v.dtype) + alpha * v",
           ("tests/test_train.py::test_teacher_and_anchor_are_the_previous_tasks_weights",),
           "WiSE(0.2) mixes 0.8 of the initial model instead of 0.2"),
]


# ----------------------------------------------------------------------------------------------
def _backup_path(rel: str) -> Path:
    return BACKUP_DIR / rel.replace("/", "__")


def restore_leftovers() -> List[str]:
    """Put back files a killed earlier run left mutated (their originals are in BACKUP_DIR)."""
    restored = []
    if BACKUP_DIR.is_dir():
        for b in BACKUP_DIR.iterdir():
            rel = b.name.replace("__", "/")
            target = REPO / rel
            target.write_bytes(b.read_bytes())
            b.unlink()
            restored.append(rel)
    return restored


def check_pattern(m: Mutant) -> str:
    """'ok', or why the mutant cannot be planted."""
    path = REPO / m.path
    if not path.is_file():
        return f"NOT FOUND (no file {m.path})"
    n = path.read_text().count(m.old)
    if n == 0:
        return f"NOT FOUND (the pattern is not in {m.path}: the code moved; update the mutant)"
    if n > 1:
        return f"AMBIGUOUS (the pattern occurs {n} times in {m.path})"
    return "ok"


def run_tests(tests: Sequence[str], timeout: float) -> Tuple[int, str, float]:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *tests]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        return r.returncode, r.stdout + r.stderr, time.perf_counter() - t0
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return -1, out, time.perf_counter() - t0


def plant_and_run(m: Mutant, timeout: float) -> Tuple[str, float, str]:
    status = check_pattern(m)
    if status != "ok":
        return status, 0.0, ""
    path = REPO / m.path
    original = path.read_bytes()
    BACKUP_DIR.mkdir(parents=True, exist_ok=True)
    backup = _backup_path(m.path)
    backup.write_bytes(original)
    try:
        path.write_text(original.decode().replace(m.old, m.new, 1))
        rc, out, dt = run_tests(m.tests, timeout)
    finally:
        path.write_bytes(original)
        backup.unlink(missing_ok=True)
    if path.read_bytes() != original:      # pragma: no cover - the write above failed
        raise RuntimeError(f"could not restore {m.path}: its original is in {backup}")
    if rc == 1:
        return "caught", dt, out
    if rc == 2 and "error" in out.lower():
        return "caught (collection error)", dt, out
    if rc == -1:
        return "caught (timeout)", dt, out
    if rc == 0:
        return "SURVIVED", dt, out
    return f"ERROR (pytest exit {rc}: check the test ids)", dt, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--list", action="store_true", help="list the mutants and whether their patterns are found")
    ap.add_argument("--only", action="append", metavar="NAME", help="run only this mutant (repeatable)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per mutant's test run (default 600)")
    ap.add_argument("--skip-baseline", action="store_true",
                    help="do not first check that the chosen tests pass on the unchanged code")
    ap.add_argument("-v", "--verbose", action="store_true", help="print the test output of survivors and errors")
    args = ap.parse_args(argv)

    def _interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _interrupt)   # unwinds through the finally blocks that restore the files
    restored = restore_leftovers()
    if restored:
        print(f"restored files a killed earlier run left mutated: {', '.join(restored)}")

    names = [m.name for m in MUTANTS]
    assert len(set(names)) == len(names), "mutant names must be unique"
    chosen = MUTANTS
    if args.only:
        unknown = [o for o in args.only if o not in names]
        if unknown:
            print(f"unknown mutant(s) {unknown}; see --list", file=sys.stderr)
            return 2
        chosen = [m for m in MUTANTS if m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name:34s} {m.path:36s} {check_pattern(m)}\n    {m.what}\n    tests: {' '.join(m.tests)}")
        return 0

    if not args.skip_baseline:
        tests = sorted({t for m in chosen for t in m.tests})
        print(f"baseline: {len(tests)} test ids on the unchanged code ...", flush=True)
        rc, out, dt = run_tests(tests, args.timeout * 2)
        if rc != 0:
            print(out[-4000:])
            print(f"the chosen tests fail (exit {rc}) on the unchanged code: fix them first "
                  f"(or --skip-baseline)", file=sys.stderr)
            return 2
        print(f"baseline passed in {dt:.0f} s", flush=True)

    rows = []
    t_all = time.perf_counter()
    for m in chosen:
        print(f"{m.name} ...", end=" ", flush=True)
        status, dt, out = plant_and_run(m, args.timeout)
        why = next((ln for ln in out.splitlines() if ln.startswith(("FAILED", "ERROR"))), "")
        print(f"{status} ({dt:.1f} s) {why[:160]}", flush=True)
        if args.verbose and not status.startswith("caught") and out:
            print(out[-3000:])
        rows.append((m, status, dt))

    caught = sum(s.startswith("caught") for _, s, _ in rows)
    survived = sum(s == "SURVIVED" for _, s, _ in rows)
    other = len(rows) - caught - survived
    print("\n| mutant | file | result | time (s) |\n| --- | --- | --- | --- |")
    for m, s, dt in rows:
        print(f"| {m.name} | {m.path} | {s} | {dt:.1f} |")
    print(f"\ncaught {caught} of {len(rows)}, survived {survived}, not run (pattern missing / error) {other}; "
          f"{time.perf_counter() - t_all:.0f} s")
    return 0 if survived == 0 and other == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
