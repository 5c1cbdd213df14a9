"""Source text for driver scripts that must die mid-run: ``kill_at_step(n)`` makes the process
SIGKILL itself when its n-th ``GiftStep`` call is about to run (a real kill: no cleanup, no
finally blocks). The drivers run in subprocesses, so this is text to paste, not an import."""
import textwrap

KILL_AT_STEP = textwrap.dedent("""
    import os, signal
    from gift_fast import step as _step_mod


    def kill_at_step(n):
        original, calls = _step_mod.GiftStep.__call__, [0]

        def counting(self, *a, **kw):
            calls[0] += 1
            if calls[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, *a, **kw)

        _step_mod.GiftStep.__call__ = counting
""")
