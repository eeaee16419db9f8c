"""Run a method script with a fault injected into its loss, for the robustness tests (the product has no fault hooks).

    python tests/faulty.py KIND STEPS [rank=R] [at=sft|tapo] -- SCRIPT.py ARGS...     (or under torchrun)

KIND: raise (RuntimeError), nan (the loss times NaN) or kill (this process sends itself SIGKILL, as kill -9 would).
STEPS: N or N-M, the steps the method logs in metrics.jsonl. rank=R: only that global rank (default every rank).
at: which loss of fine_r1.py (default tapo). The function under test is patched in place: dive_k.grpo_loss,
speciarl.speciarl_loss, fine_r1.tapo_loss or common.sft_loss (fine_r1's SFT). A loss belongs to the step after the last
one the run logged (or resumed at), which is how the methods number their steps.
"""
import importlib
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

LOSSES = {"dive_k": "grpo_loss", "speciarl": "speciarl_loss", "fine_r1": "tapo_loss"}


def main():
    split = sys.argv.index("--")
    kind, steps, *options = sys.argv[1:split]
    script, args = sys.argv[split + 1], sys.argv[split + 2:]
    options = dict(o.split("=", 1) for o in options)
    first, _, last = steps.partition("-")
    first, last = int(first), int(last or first)
    rank = int(os.environ.get("RANK", 0))
    spec = " ".join(sys.argv[1:split])
    logged = {"step": 0}

    log, resume_at = common.MetricsLog.log, common.MetricsLog.resume_at

    def log_and_count(self, record):
        logged["step"] = max(logged["step"], int(record.get("step", 0)))
        return log(self, record)

    def resume_and_count(self, step):
        logged["step"] = step
        return resume_at(self, step)
    common.MetricsLog.log, common.MetricsLog.resume_at = log_and_count, resume_and_count

    def faulty(loss_fn):
        def wrapped(*a, **k):
            out = loss_fn(*a, **k)
            step = logged["step"] + 1
            if not first <= step <= last or int(options.get("rank", rank)) != rank:
                return out
            if kind == "nan":
                return (out[0] * float("nan"), *out[1:]) if isinstance(out, tuple) else out * float("nan")
            print(f"faulty.py: injecting {kind} at step {step} on rank {rank}", file=sys.stderr, flush=True)
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected fault ({spec}) at step {step} on rank {rank}")
        return wrapped

    name = os.path.splitext(os.path.basename(script))[0]
    method = importlib.import_module(name)
    if options.get("at") == "sft":
        common.sft_loss = faulty(common.sft_loss)
    else:
        setattr(method, LOSSES[name], faulty(getattr(method, LOSSES[name])))
    sys.argv = [script, *args]
    common.run_script(method.main)


if __name__ == "__main__":
    main()
