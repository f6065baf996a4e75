"""Crash harness (issue 17): SIGKILL each long verb at random moments; the rerun must finish the job.

For every verb (``build``, ``distill``, ``sft``, ``dpo``, ``gen-data``, ``rag index``, ``quantize``,
``export``) on tiny random models (a 2-layer llama with hidden size 64, a 1-layer BERT encoder
for ``rag index``; nothing is downloaded):

1. an uninterrupted seeded **reference** run, timed (wall seconds ``T``);
2. ``--kills`` times, in a fresh directory: start the same command, send it ``SIGKILL`` at a
   moment drawn uniformly from ``[0, T)`` (seeded), then **rerun** the command to completion
   (training verbs always run with ``--resume``, as a user continues a run), and check

   * the rerun exits 0 (and a run that finished before its kill exited 0);
   * its output **equals** the reference's (:func:`compare_trees`): every file present on one side
     is present on the other; model weights (``*.safetensors``) and GGUF files bitwise; JSON
     files (manifests, stage records, ``index.json``, ``trainer_state.json``, ``report.json``)
     equal after dropping the per-call figures listed in :data:`VOLATILE` (timestamps, wall and
     CPU seconds, speeds, the mean training loss *of the steps run in this call*, ``resumed``
     flags); every other file bitwise. Nothing is compared within a tolerance: a resumed run
     is required to give the same bits;
   * no ``.tmp-*`` / ``.old-*`` (or ``*.tmp``) entry is left anywhere under the trial directory
     (the output's parent).

Commands run in processes forked from this harness after it has imported slmkit, torch and
transformers (``--mode fork``, the default: the ~4 s import is paid once, so kills land in the
verb's own work); ``--mode exec`` runs ``python -m slmkit`` instead. Either way the verb runs in
its own process and is killed with ``SIGKILL`` (no handler, no cleanup). The harness itself never
runs a torch op, so forked children do not inherit a started OpenMP pool.

Usage: PYTHONPATH=src python bench/crash.py [--kills 50] [--verbs build,distill,...] [--seed 0]
       [--mode fork|exec] [--threads 2] [--budget-s 1800] [--keep DIR] [--json FILE]

``tests/test_crash.py`` runs a small sample (2 kills per verb) through :func:`run_harness`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

#: JSON keys whose values are measurements of one process, not results: dropped before comparing
#: (clocks, speeds, and flags or paths saying that a run was resumed and from where).
VOLATILE = frozenset({
    "created", "generated", "seconds", "cpu_seconds", "build_seconds", "build_cpu_seconds", "started", "finished", "resumed",
    "resumed_from", "status", "train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos",
    "quantize_seconds", "total_seconds",
})
#: Files that are logs or locks, not results (their names are compared, not their bytes).
UNCOMPARED = frozenset({"build.log", ".lock", "report.html"})
LEFTOVER_MARKS = (".tmp-", ".old-")

VERBS = ("build", "distill", "sft", "dpo", "gen-data", "rag-index", "quantize", "export")


# --------------------------------------------------------------------------- inputs


def make_inputs(root: Path, small: bool = False) -> dict[str, Path]:
    """Tiny models and data files under ``root`` (deterministic; ``small``: the CI sample's). Runs torch:
    call it in a child."""
    import torch
    from transformers import BertConfig, BertModel

    from slmkit.models.tiny import save_tiny, tiny_llama_config, tiny_model, tiny_tokenizer

    torch.set_num_threads(1)
    root.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer()
    model = save_tiny(tiny_model(tiny_llama_config(tok)), tok, root / "model")
    torch.manual_seed(0)
    enc_dir = root / "encoder"
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=256)).eval().save_pretrained(enc_dir)
    tok.save_pretrained(enc_dir)
    rng = random.Random(0)
    subjects = ["the cat", "a dog", "my friend", "the river", "a teacher", "the small bird"]
    objects = ["the house", "a question", "green apples", "the old book", "a bright star"]

    def sentence() -> str:
        return f"{rng.choice(subjects).capitalize()} sees {rng.choice(objects)}, {rng.randint(1, 99)} steps away."

    chats = [{"messages": [{"role": "user", "content": f"Where is {rng.choice(subjects)} {i}?"},
                           {"role": "assistant", "content": " ".join(sentence() for _ in range(2))}]} for i in range(24)]
    n = 8 if small else 24
    chats = chats[:n]
    (root / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    pairs = [{"prompt": f"Where is {rng.choice(subjects)} {i}?", "chosen": sentence(), "rejected": "no."} for i in range(6 if small else 12)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (root / "text.txt").write_text("\n\n".join(" ".join(sentence() for _ in range(6)) for _ in range(6 if small else 20)))
    prompts = [{"id": f"p{i}", "prompt": f"Tell me where {rng.choice(subjects)} is."} for i in range(n)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    docs = root / "docs"
    docs.mkdir(exist_ok=True)
    for d in range(20 if small else 40):  # ~300 / ~600 chunks of 8 words: two / three commits of 256 chunks
        (docs / f"doc{d:02d}.txt").write_text("\n\n".join(" ".join(sentence() for _ in range(2)) for _ in range(8)))
    recipe = (
        f"name: crash\nteacher: {model}\nseed: 0\nstages:\n"
        f"  - stage: gen-data\n    n: {6 if small else 12}\n    max_new_tokens: 12\n    temperature: 1.0\n    holdout: 0.25\n"
        "  - stage: student\n"
        f"  - stage: distill\n    max_steps: {3 if small else 8}\n    save_steps: 1\n    batch_size: 2\n    block_size: 96\n"
        "  - stage: quantize\n    method: gptq\n    gguf: Q4_0\n    calib_samples: 4\n    calib_len: 32\n"
        "  - stage: export\n    format: gguf\n    type: Q4_0\n"
        + ("" if small else "  - stage: eval\n    max_tokens: 64\n    context: 32\n    efficiency: false\n")
    )
    (root / "recipe.yaml").write_text(recipe)
    return {"model": model, "encoder": enc_dir}


@dataclass(frozen=True)
class Verb:
    """One long verb: its argv (given the inputs and the trial directory) and the paths it writes."""

    name: str
    argv: Callable[[Path, Path], list[str]]  #: (inputs, trial dir) -> argv after ``slmkit``
    outputs: tuple[str, ...]  #: paths (relative to the trial dir) compared with the reference


def _verbs(small: bool = False) -> dict[str, Verb]:
    train = ["--max-steps", "3" if small else "8", "--save-steps", "1" if small else "2", "--seed", "0", "--resume"]
    return {v.name: v for v in (
        Verb("build", lambda i, d: ["build", str(i / "recipe.yaml"), "--output", str(d / "run"), "--json"], ("run",)),
        Verb("distill", lambda i, d: ["distill", "--teacher", str(i / "model"), "--student", str(i / "model"),
                                      "--data", str(i / "text.txt"), "--loss", "fkl", "--output", str(d / "out"),
                                      "--batch-size", "2", "--block-size", "32", *train], ("out",)),
        Verb("sft", lambda i, d: ["sft", str(i / "model"), "--data", str(i / "chats.jsonl"), "--output", str(d / "out"),
                                  "--batch-size", "2", "--max-length", "64", *train], ("out", "out.checkpoints")),
        Verb("dpo", lambda i, d: ["dpo", str(i / "model"), "--data", str(i / "pairs.jsonl"), "--output", str(d / "out"),
                                  "--lora", "--batch-size", "2", "--max-length", "64", *train], ("out", "out.checkpoints")),
        Verb("gen-data", lambda i, d: ["gen-data", str(i / "model"), "--prompts", str(i / "prompts.jsonl"),
                                       "--output", str(d / "data.jsonl"), "--max-new-tokens", "24", "--temperature", "1.0",
                                       "--min-words", "1", "--batch-size", "4", "--seed", "0"],
                 ("data.jsonl", "data.jsonl.rejected.jsonl")),
        Verb("rag-index", lambda i, d: ["rag", "index", str(i / "docs"), "--output", str(d / "idx"),
                                        "--embedder", str(i / "encoder"), "--max-words", "8", "--overlap", "0"], ("idx",)),
        Verb("quantize", lambda i, d: ["quantize", str(i / "model"), "--method", "gptq", "--gguf", "Q4_K_M",
                                       "--calib", str(i / "text.txt"), "--calib-samples", "4", "--calib-len", "32",
                                       "--output", str(d / "q")], ("q",)),
        Verb("export", lambda i, d: ["export", str(i / "model"), "--format", "gguf", "--type", "Q4_K_M",
                                     "--output", str(d / "m.gguf")], ("m.gguf",)),
    )}


# --------------------------------------------------------------------------- comparing results


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _first_json_diff(a, b, where: str = "") -> str:
    if type(a) is not type(b):
        return f"{where or '/'}: {str(a)[:60]!r} vs {str(b)[:60]!r}"
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{where}/{k}: only in {'the rerun' if k not in a else 'the reference'}"
            if a[k] != b[k]:
                return _first_json_diff(a[k], b[k], f"{where}/{k}")
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{where}: {len(a)} vs {len(b)} items"
        for n, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_json_diff(x, y, f"{where}[{n}]")
    return f"{where or '/'}: {str(a)[:60]!r} vs {str(b)[:60]!r}"


def _safetensors_diff(a: Path, b: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(a), "np") as fa, safe_open(str(b), "np") as fb:
        ka, kb = set(fa.keys()), set(fb.keys())
        if ka != kb:
            return f"tensor names differ ({sorted(ka ^ kb)[:3]})"
        for k in sorted(ka):
            x, y = fa.get_tensor(k), fb.get_tensor(k)
            if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
                return f"tensor {k} differs"
        if fa.metadata() != fb.metadata():
            return "metadata differs"
    return ""  # same tensors and metadata: safetensors writes the metadata map in a per-process order


def _tree(path: Path) -> dict[str, Path]:
    if path.is_file():
        return {"": path}
    out = {}
    for dirpath, dirs, files in os.walk(path):
        for name in files + [d for d in dirs if not any(True for _ in os.scandir(Path(dirpath) / d))]:
            p = Path(dirpath) / name
            out[str(p.relative_to(path))] = p
    return out


def compare_trees(ref: Path, got: Path) -> list[str]:
    """Differences between a reference output and a rerun's (empty when equal, see the module docstring)."""
    if ref.exists() != got.exists():
        return [f"{got.name}: {'missing' if ref.exists() else 'unexpected'}"]
    if not ref.exists():
        return []
    a, b = _tree(ref), _tree(got)
    problems = [f"{got.name}/{k}: only in the {'reference' if k in a else 'rerun'}" for k in sorted(set(a) ^ set(b))]
    for k in sorted(set(a) & set(b)):
        pa, pb = a[k], b[k]
        label = f"{got.name}/{k}".rstrip("/")
        if pa.name in UNCOMPARED or pa.is_dir():
            continue
        da, db = pa.read_bytes(), pb.read_bytes()
        if da == db:
            continue
        if pa.suffix == ".json":
            try:
                ja, jb = _strip(json.loads(da)), _strip(json.loads(db))
            except ValueError as err:
                problems.append(f"{label}: not JSON ({err})")
                continue
            if ja != jb:
                problems.append(f"{label}: {_first_json_diff(ja, jb)}")
        elif pa.suffix == ".safetensors":
            why = _safetensors_diff(pa, pb)
            if why:
                problems.append(f"{label}: {why}")
        else:
            problems.append(f"{label}: {len(da)} vs {len(db)} bytes, differ")
    return problems


def leftovers(root: Path) -> list[str]:
    """Temporary names a killed write left under ``root`` (and that the rerun did not clean)."""
    found = []
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            if any(m in name for m in LEFTOVER_MARKS) or name.endswith(".tmp"):
                found.append(str((Path(dirpath) / name).relative_to(root)))
    return sorted(found)


# --------------------------------------------------------------------------- running commands


class Runner:
    """Starts ``slmkit ARGV`` in a new process: forked from this (pre-imported) one, or exec'd."""

    def __init__(self, mode: str = "fork", threads: int = 2):
        self.mode, self.threads = mode, threads
        if mode == "fork":
            import torch  # noqa: F401  (imported, never run: children start warm)
            import transformers  # noqa: F401
            import trl  # noqa: F401

            import slmkit.cli  # noqa: F401

    def start(self, argv: list[str], log: Path, cwd: Path) -> int:
        if self.mode == "exec":
            env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "TOKENIZERS_PARALLELISM": "false"}
            with open(log, "wb") as fh:
                proc = subprocess.Popen([sys.executable, "-m", "slmkit", *argv], stdout=fh, stderr=subprocess.STDOUT,
                                        cwd=cwd, env=env)
            self._procs = getattr(self, "_procs", {})
            self._procs[proc.pid] = proc
            return proc.pid
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # child: run the verb, never return into the harness
            code = 1
            try:
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.chdir(cwd)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                import torch

                torch.set_num_threads(self.threads)
                from slmkit.cli import main

                code = main(argv)
            except BaseException:  # noqa: BLE001 - report anything, exit 1
                traceback.print_exc()
                code = 1
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code if isinstance(code, int) else 1)
        return pid

    def poll(self, pid: int) -> int | None:
        """Exit code, or None while running (a process killed by a signal gives -signum)."""
        if self.mode == "exec":
            return self._procs[pid].poll()
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == 0:
            return None
        return os.waitstatus_to_exitcode(status)

    def wait(self, pid: int, timeout: float) -> int | None:
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            rc = self.poll(pid)
            if rc is not None:
                return rc
            time.sleep(0.01)
        self.kill(pid)
        return None

    def kill(self, pid: int) -> int:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if self.mode == "exec":
            return self._procs.pop(pid).wait()
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status)


def _tail(log: Path, n: int = 6) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# --------------------------------------------------------------------------- the harness


@dataclass
class Trial:
    verb: str
    n: int
    kill_at_s: float
    killed: bool  #: still running when the kill came (else it had finished: first_rc)
    first_rc: int | None
    rerun_rc: int | None  #: None: the rerun hung past its time limit
    rerun_s: float
    differences: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    log_tail: str = ""

    @property
    def ok(self) -> bool:
        return (self.rerun_rc == 0 and (self.killed or self.first_rc == 0) and not self.differences
                and not self.leftovers)


@dataclass
class VerbReport:
    verb: str
    reference_s: float
    trials: list[Trial] = field(default_factory=list)
    error: str = ""

    def summary(self) -> dict:
        t = self.trials
        return {
            "verb": self.verb, "reference_s": round(self.reference_s, 2), "trials": len(t),
            "killed": sum(x.killed for x in t), "finished_before_kill": sum(not x.killed for x in t),
            "rerun_exit_0": sum(x.rerun_rc == 0 for x in t), "rerun_exit_1": sum(x.rerun_rc == 1 for x in t),
            "rerun_other_exit": sum(x.rerun_rc not in (0, 1) for x in t), "equal": sum(not x.differences for x in t),
            "with_leftovers": sum(bool(x.leftovers) for x in t), "ok": sum(x.ok for x in t),
            "mean_rerun_s": round(sum(x.rerun_s for x in t) / max(len(t), 1), 2), "error": self.error,
        }


def run_verb(verb: Verb, inputs: Path, work: Path, runner: Runner, kills: int, rng: random.Random,
             deadline: float, say: Callable[[str], None] = print) -> VerbReport:
    """Reference run, then ``kills`` kill-and-rerun trials, all in one directory (``work/VERB``), so that
    every run is the very same command; failed trials are moved to ``work/failed/VERB-NNN``."""
    run_dir, ref = work / verb.name, work / "reference" / verb.name
    run_dir.mkdir(parents=True)
    ref.parent.mkdir(parents=True, exist_ok=True)
    argv = verb.argv(inputs, run_dir)
    t0 = time.monotonic()
    pid = runner.start(argv, work / f"{verb.name}.log", run_dir)
    rc = runner.wait(pid, max(600.0, deadline - time.monotonic()))
    report = VerbReport(verb.name, time.monotonic() - t0)
    if rc != 0:
        report.error = f"reference run exited {rc}: {_tail(work / f'{verb.name}.log')}"
        return report
    bad = leftovers(run_dir)
    if bad:
        report.error = f"the reference run left {bad}"
        return report
    os.rename(run_dir, ref)
    limit = max(60.0, 10 * report.reference_s)
    for n in range(kills):
        if time.monotonic() > deadline:
            report.error = f"time budget spent after {n} of {kills} kills"
            break
        run_dir.mkdir()
        kill_at = rng.uniform(0, report.reference_s)
        pid = runner.start(argv, work / "first.log", run_dir)
        t_kill = time.monotonic() + kill_at
        first = None
        while time.monotonic() < t_kill and first is None:
            first = runner.poll(pid)
            time.sleep(0.002)
        killed = first is None
        if killed:
            runner.kill(pid)
        t1 = time.monotonic()
        pid = runner.start(argv, work / "rerun.log", run_dir)
        rerun = runner.wait(pid, limit)
        trial = Trial(verb.name, n, round(kill_at, 3), killed, first, rerun, round(time.monotonic() - t1, 2))
        if rerun == 0:
            for out in verb.outputs:
                trial.differences += compare_trees(ref / out, run_dir / out)
        trial.leftovers = leftovers(run_dir)
        if trial.ok:
            shutil.rmtree(run_dir)
        else:
            trial.log_tail = _tail(work / "rerun.log")
            kept = work / "failed" / f"{verb.name}-{n:03d}"
            kept.parent.mkdir(exist_ok=True)
            os.rename(run_dir, kept)
            for log in ("first.log", "rerun.log"):
                with contextlib.suppress(OSError):
                    os.rename(work / log, kept.parent / f"{kept.name}.{log}")
            say(f"  FAIL {verb.name} #{n} (kill at {kill_at:.2f} s, killed={killed}, first rc={first}, rerun rc={rerun}): "
                f"{trial.differences[:3]} {trial.leftovers[:3]}\n    {trial.log_tail}")
        report.trials.append(trial)
    return report


def run_harness(verbs: list[str], kills: int, seed: int = 0, mode: str = "fork", threads: int = 2,
                budget_s: float = 1800.0, work: Path | None = None, say: Callable[[str], None] = print,
                small: bool = False) -> dict:
    """Run the harness; returns ``{"pass", "verbs": [summary...], "failures": [trial...], ...}``."""
    unknown = sorted(set(verbs) - set(VERBS))
    if unknown:
        raise SystemExit(f"unknown verbs {unknown}; known: {', '.join(VERBS)}")
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="slmkit-crash-")) if own else Path(work)
    runner = Runner(mode, threads)
    t0 = time.monotonic()
    deadline = t0 + budget_s
    try:
        inputs = work / "inputs"
        pid = os.fork() if mode == "fork" else None
        if pid == 0:  # build the inputs in a child: the harness never runs torch itself
            code = 0
            try:
                make_inputs(inputs, small)
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
                code = 1
            os._exit(code)
        if pid is None:
            subprocess.run([sys.executable, __file__, "--make-inputs", str(inputs)] + (["--small"] if small else []), check=True)
        else:
            _, status = os.waitpid(pid, 0)
            if os.waitstatus_to_exitcode(status) != 0:
                raise RuntimeError("could not build the tiny inputs")
        reports = []
        table = _verbs(small)
        for name in verbs:
            rng = random.Random(f"{seed}:{name}")
            say(f"{name}: reference run, then {kills} kills")
            rep = run_verb(table[name], inputs, work / "trials", runner, kills, rng, deadline, say=say)
            s = rep.summary()
            say(f"  {json.dumps(s)}")
            reports.append(rep)
        failures = [asdict(t) for r in reports for t in r.trials if not t.ok]
        return {
            "pass": all(not r.error and all(t.ok for t in r.trials) and len(r.trials) == kills for r in reports),
            "kills_per_verb": kills, "small": small, "seed": seed, "mode": mode, "threads": threads,
            "seconds": round(time.monotonic() - t0, 1), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "verbs": [r.summary() for r in reports], "failures": failures, "work": str(work),
            "kill_times": {r.verb: [t.kill_at_s for t in r.trials] for r in reports},
        }
    finally:
        if own and not (work / "trials" / "failed").exists():  # failed trials stay for inspection
            shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=50, help="kills per verb")
    ap.add_argument("--verbs", default=",".join(VERBS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mode", choices=("fork", "exec"), default="fork")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per command")
    ap.add_argument("--budget-s", type=float, default=1800.0, help="stop starting new kills after this many seconds")
    ap.add_argument("--keep", type=Path, default=None, help="work directory (kept; failed trials stay there)")
    ap.add_argument("--small", action="store_true", help="the CI sample's smaller workloads (fewer steps, rows, documents)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--make-inputs", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make_inputs is not None:
        make_inputs(args.make_inputs, args.small)
        return 0
    res = run_harness([v for v in args.verbs.split(",") if v], args.kills, args.seed, args.mode, args.threads,
                      args.budget_s, args.keep, small=args.small)
    text = json.dumps(res, indent=2)
    if args.json:
        args.json.write_text(text)
    print(json.dumps({k: res[k] for k in ("pass", "kills_per_verb", "seconds", "machine")}))
    for s in res["verbs"]:
        print(json.dumps(s))
    return 0 if res["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
