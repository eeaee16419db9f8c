"""Run a method script with a fault injected into its loss, for the robustness tests (the product has no fault hooks).

    python tests/faulty.py KIND STEPS [rank=R] -- SCRIPT.py ARGS...        (or under torchrun)

KIND: raise (RuntimeError), nan (the loss times NaN) or kill (this process sends itself SIGKILL, as kill -9 would).
STEPS: N or N-M, counted in optimizer steps from the start of the run (a resumed run counts on from the step it
resumed at): the logged step of dive_k and speciarl when each step is one optimizer step (one update per batch,
--minibatches 1), TAPO's step for fine_r1. rank=R: only that global rank (default every rank).
The function under test is patched in place: dive_k.grpo_loss, speciarl.speciarl_loss or fine_r1.tapo_loss.
"""
import importlib
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import lifecycle

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
    done = {"steps": 0}  # optimizer steps finished: each method clips its gradients once per optimizer step

    resume_at, clip_gradients = lifecycle.MetricsLog.resume_at, common.clip_gradients

    def resume_and_count(self, step):
        done["steps"] = step
        return resume_at(self, step)

    def clip_and_count(*a, **k):
        done["steps"] += 1
        return clip_gradients(*a, **k)
    lifecycle.MetricsLog.resume_at, common.clip_gradients = resume_and_count, clip_and_count

    def faulty(loss_fn):
        def wrapped(*a, **k):
            out = loss_fn(*a, **k)
            step = done["steps"] + 1
            if not first <= step <= last or int(options.get("rank", rank)) != rank:
                return out
            if kind == "nan":
                return (out[0] * float("nan"), *out[1:])
            print(f"faulty.py: injecting {kind} at step {step} on rank {rank}", file=sys.stderr, flush=True)
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected fault ({spec}) at step {step} on rank {rank}")
        return wrapped

    name = os.path.splitext(os.path.basename(script))[0]
    method = importlib.import_module(name)
    setattr(method, LOSSES[name], faulty(getattr(method, LOSSES[name])))
    sys.argv = [script, *args]
    lifecycle.run_script(method.main)


if __name__ == "__main__":
    main()
