"""
What a run reports: the log (the console and logs/train.log), logs/metrics.jsonl (a JSON row per
logged step and per evaluation, which `python dynamics.py plot` draws), and Weights & Biases with
save_to_wandb=True (WANDB_MODE=offline works with no key). Rank 0 reports; on the other ranks every
call does nothing, so train.py makes them wherever it stands.
"""

import contextlib
import json
import os
import shutil
import time
from datetime import datetime

import dynamics


def check_wandb():
    """Refuse save_to_wandb=True where wandb could not log (no key, online), before any work."""
    import wandb
    if os.environ.get("WANDB_MODE", "online") not in ("offline", "disabled", "dryrun") and not (
            os.environ.get("WANDB_API_KEY") or wandb.login(prompt=False, verify=False)):
        raise SystemExit("config error: save_to_wandb=True but no wandb key: put `export WANDB_API_KEY=...` in "
                         ".env, run `wandb login`, or set WANDB_MODE=offline")


class Monitor:
    def __init__(self, master):
        self.master = master
        self.file, self.waiting = None, []  # logs/train.log opens with the run folder; lines before it wait
        self.run_dir = self.wandb = None
        self.previous_weights = None  # the captured layers' val weights at the last checkpoint (wandb)

    def log(self, msg, console=True):
        """A line, time-stamped, to the console (console=False: the file only) and logs/train.log."""
        if not self.master:
            return
        line = f"[{datetime.now():%H:%M:%S}] {msg}"
        if console:
            print(line, flush=True)
        self.waiting.append(line)
        if self.file:
            with self.writing("logs/train.log"):
                self.file.write("\n".join(self.waiting) + "\n")
                self.file.flush()
            self.waiting.clear()

    def refuse(self, msg):
        """A refusal that ends the run: into logs/train.log too, then raised by the caller as SystemExit."""
        self.log(msg, console=False)  # (the console gets it once, from SystemExit)
        return SystemExit(msg)

    def fail(self, reason, fix="lower lr (or check the data)"):
        """End a run that cannot go on (every rank raises), naming the checkpoint it resumes from."""
        link = os.path.join(self.run_dir, "checkpoints", "latest")
        last = os.path.realpath(link) if os.path.lexists(link) else None
        raise self.refuse(f"{reason}; stopping. The last good checkpoint is {last}: {fix} and run again to resume "
                          f"from it." if last else f"{reason}; stopping, with no checkpoint saved.")

    @contextlib.contextmanager
    def writing(self, name):
        """A write to the run folder; one that fails (a full disk) stops the run with one line, which
        leaves it resumable from its last checkpoint (rank 0 stops; torchrun then stops the others)."""
        try:
            yield
        except OSError as e:
            self.file = None  # nothing more is written to the log
            free = shutil.disk_usage(self.run_dir).free / 2**30
            raise SystemExit(f"cannot write {os.path.join(self.run_dir, name)} ({e.strerror}; {free:.1f} GiB free "
                             f"there): stopping. Free some space, then run again: the run resumes from its last "
                             f"checkpoint") from None

    def open(self, run_dir):
        """Start writing logs/ in the run folder (made by then), with the lines said before it."""
        self.run_dir = run_dir
        if self.master:
            with self.writing("logs/train.log"):
                os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
                self.file = open(os.path.join(run_dir, "logs", "train.log"), "a")

    def start_wandb(self, project, entity, run_name, config):
        """The wandb run of this run: the same id on every session, so a resumed run continues it."""
        if self.master:
            import wandb
            self.wandb = wandb.init(project=project or None, entity=entity or None, name=run_name,
                                    id=run_name.replace("/", "-"), resume="allow", dir=self.run_dir, config=config,
                                    settings=wandb.Settings(init_timeout=60))

    def metrics(self, row):
        """A row {"step": N, name: number, ...} to logs/metrics.jsonl and wandb."""
        if self.master:
            with self.writing("logs/metrics.jsonl"), open(os.path.join(self.run_dir, "logs", "metrics.jsonl"),
                                                          "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.wandb is not None:
                self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def evaluation(self, step, results, where):
        """An evaluation (dynamics.eval_results), every number of it: the log, eval_results/step_N.json,
        metrics.jsonl and wandb (as eval/<name>; the perplexity, exp(loss), only in the file)."""
        numbers = {k: v for k, v in results.items() if isinstance(v, float) and k != "perplexity"}
        self.log(f"step {step}: eval " + ", ".join(f"{k} {v:.4f}" for k, v in numbers.items())
                 + f" on {results['rows']} sequences of {where}")
        if self.master:
            path = os.path.join(self.run_dir, "eval_results", f"step_{step}.json")
            with self.writing(f"eval_results/step_{step}.json"):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path + ".tmp", "w") as f:  # then renamed over it: a crash leaves the old file or the new
                    json.dump(results, f, indent=2)
                os.replace(path + ".tmp", path)
        self.metrics({"step": step, **{f"eval/{k}": v for k, v in numbers.items()}})

    def dynamics(self, step, captured):
        """A checkpoint's per-layer numbers to wandb, as `python dynamics.py plot` draws them:
        weight norms, their change since the last checkpoint, gradient norms of each split."""
        if self.wandb is None:
            return
        val, summary = captured["val"][1], {}
        if "train" in captured:
            summary.update(dynamics.summaries(*(captured["train"][1][k] for k in ("weights", "gradients")),
                                              split="train"))
        summary.update(dynamics.summaries(val["weights"], val["gradients"], self.previous_weights))
        self.wandb.log({f"dynamics/{k}": v for k, v in summary.items()}, step=step)
        self.previous_weights = val["weights"]

    def start_clock(self, step, max_steps, tokens_per_step, pauses_from, mfu_per_token=None):
        """Time this session from `step`: tokens/s counts training time only (not the pauses), and the eta is
        the steps left at that speed plus the pauses left (pauses_from(step): how many, the one due
        at `step` included) at their measured cost. mfu_per_token: FLOPs per token / the GPUs' peak."""
        self.start_step, self.max_steps, self.tokens_per_step = step, max_steps, tokens_per_step
        self.pauses_from, self.mfu_per_token = pauses_from, mfu_per_token
        self.t_start = self.t_last = time.time()
        self.last_step, self.paused, self.pauses = step, 0.0, 0  # the pauses' time this session, and how many

    def pause(self, seconds, counted=True):
        """Training stood still for `seconds` (an evaluation or a checkpoint: one more, if counted)."""
        self.t_last += seconds
        self.paused += seconds
        self.pauses += counted

    def step(self, step, loss, lr, grad_norm):
        """The log's line for a step and its metrics row, with tokens/s, MFU where known, and the eta."""
        now = time.time()
        tok_s = (step - self.last_step) * self.tokens_per_step / (now - self.t_last)
        row = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tok_s}
        mfu = ""
        if self.mfu_per_token:
            row["mfu"] = tok_s * self.mfu_per_token
            mfu = f", MFU {row['mfu']:.1%}"
        eta = ((now - self.t_start - self.paused) / (step - self.start_step) * (self.max_steps - step)
               + (self.paused / self.pauses if self.pauses else 0.0) * self.pauses_from(step))
        self.log(f"step {step}/{self.max_steps} | loss {loss:.4f} | lr {lr:.2e} | norm {grad_norm:.3f} | "
                 f"{tok_s:,.0f} tok/s{mfu} | "
                 f"elapsed {now - self.t_start:.0f}s | eta {eta:.0f}s")
        self.metrics(row)
        self.t_last, self.last_step = now, step

    def finish(self):
        if self.wandb is not None:
            self.wandb.finish()
