"""The GPU validation pack: one command that proves the CUDA side on a GPU machine.

Stages, each in its own processes with a time budget (a stage that fails or runs out of time is
recorded and the next one runs):

0. env     the device, driver, CUDA, cuDNN, NCCL, torch versions (and the git commit);
1. build   the native module with its CUDA kernels (abnexp.norm.native.build(cuda=True)), then,
           for each GPU kernel backend (``ABNEXP_KERNELS=native``: kernels/abn_cuda.cu, and
           ``ABNEXP_KERNELS=triton``: kernels/abn_triton.py), every CUDA test -- the tests skipped
           with "needs a CUDA GPU" without one, in the test files that hold them: every layer in
           fp32 / fp16 / bf16 and both layouts against torch's, torch.compile(fullgraph=True), the
           synchronized layers over NCCL (pass / fail / skip counts from pytest's JUnit XML) --
           and ``abnexp kernels check --backend <name>`` (every operator against the reference);
2. bench   per backend, forward + backward of InPlace-ABN I and II against torch's BatchNorm2d +
           in-place F.leaky_relu_ (cuDNN), and the bandwidth of the backend's statistics / forward
           kernels against a device-to-device copy of the same tensor (CUDA events, medians);
3. memory  InPlace-ABN Table 3 by real allocation: the largest batch of DeepLabV3 + ResNeXt-101 /
           WideResNet-38 at output stride 8 on 512² crops under a 12 GiB per-process cap, norm=bn
           vs norm=inplace_abn, beside the planner's figures (``abnexp memory``);
4. train   50 steps of ResNeXt-50 with norm=inplace_abn vs norm=bn (amp=bf16, channels_last) on the
           demo data; images/s from the run's metrics.jsonl.

Writes ``results/gpu_<device>.md`` (``--out DIR`` elsewhere) with every figure and the command
that gives it, the goals and whether each is met. ``--dry-run`` runs every stage on the CPU on
tiny inputs (CPU-only build, a couple of CPU tests, tiny benchmark, a memory search with a
simulated capacity, 2 training steps) and writes only to ``--out`` (default a temporary folder),
never to results/; tests/scripts/test_gpu_check.py runs it so that this script cannot rot.

Run it through scripts/gpu_check.sh, which makes the project importable first (an overlay on
PYTHONPATH); every subprocess starts in the work folder, so the checkout's abnexp/ folder (without
its configs) never comes first on sys.path. Units: bytes,
seconds, milliseconds (ms), GB/s = 1e9 bytes per second, GiB / MiB = 2**30 / 2**20 bytes.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKERS = str(ROOT / "scripts" / "gpu_check_workers.py")
GPU_BACKENDS = ("native", "triton")
"""The GPU kernel backends the pack checks and benchmarks (abnexp.norm.backends.BACKENDS)."""
CUDA_SKIP_REASON = "needs a CUDA GPU"
ORDER = ("env", "build", "tests", "bench", "memory", "train")
TITLES = {"env": "0. Environment", "build": "1a. Native build", "tests": "1b. CUDA tests",
          "bench": "2. Benchmarks", "memory": "3. Memory: Table 3 by real allocation",
          "train": "4. Training throughput"}
CAPS = {"env": 30, "build": 180, "tests": 160, "bench": 80, "memory": 100, "train": 90}
"""Seconds a stage may take at most (full run; tests and bench cover both backends)."""
RESERVE = {"env": 10, "build": 30, "tests": 60, "bench": 40, "memory": 50, "train": 50}
"""Seconds kept back for each later stage when giving a stage its budget."""
DRY_CAPS = {"env": 60, "build": 60, "tests": 90, "bench": 60, "memory": 120, "train": 120}

MEMORY_CAP_GIB = 12  # the paper's Titan Xp
TABLE3_PAPER = {"resnext101": {"bn": 4, "inplace_abn": 7}, "wideresnet38": {"bn": 5, "inplace_abn": 7}}
"""InPlace-ABN Table 3, Cityscapes 512² crops per GPU (the paper's totals over 4 GPUs / 4)."""
MEMORY_NETS = (("ResNeXt-101", "resnext101"), ("WideResNet-38", "wideresnet38"))
DRY_MEMORY_NETS = (("ResNet-18 (dry run)", "resnet18"),)
NORMS = ("bn", "inplace_abn")
DRY_CPU_TESTS = (("test_norm_parity.py", "test_parity_relu[bn]"),
                 ("test_norm_parity.py", "test_parity_relu[checkpoint]"))
"""CPU tests the dry run runs beside the (skipped) CUDA tests: file name (found under tests/), test id."""

GOAL_SPEED, GOAL_BANDWIDTH, GOAL_MEMORY = 1.00, 0.70, 0.55


def slug(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia_h200'."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "unknown"


def mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:.0f}"


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class Check:
    """Runs the stages under one wall-clock budget and keeps what each one found."""

    def __init__(self, args):
        self.args, self.dry = args, args.dry_run
        self.t0 = time.monotonic()
        self.started = datetime.datetime.now().astimezone()
        self.deadline = self.t0 + args.budget
        self.work = Path(args.work or tempfile.mkdtemp(prefix="abnexp_gpu_check_")).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.out = Path(args.out).resolve() if args.out else (self.work if self.dry else ROOT / "results")
        self.logs = Path(args.logs).resolve() if args.logs else self.work
        self.logs.mkdir(parents=True, exist_ok=True)
        self.log_path = self.logs / "gpu_check.log"
        self.log_path.write_text("")
        self.py = sys.executable
        self.env = dict(os.environ, PYTHONUNBUFFERED="1",
                        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "scripts"), os.environ.get("PYTHONPATH")])))
        self.stage_env: dict[str, str] = {}  # set for every later stage (TORCH_CUDA_ARCH_LIST)
        self.backends: list[str] = []  # the kernel backends the tests and benchmarks cover (set by build)
        self.stages: dict[str, dict] = {}
        self.info: dict = {}

    # ---------------------------------------------------------------------------- plumbing
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def say(self, message: str) -> None:
        line = f"[{datetime.datetime.now():%H:%M:%S} +{self.elapsed():4.0f}s] {message}"
        print(line, flush=True)
        with open(self.log_path, "a") as log:
            log.write(line + "\n")

    def budget(self, stage: str) -> float:
        """Seconds for ``stage``: its cap, less what the later stages need, within the total."""
        if self.dry:
            return DRY_CAPS[stage]
        left = self.deadline - time.monotonic()
        later = sum(RESERVE[s] for s in ORDER[ORDER.index(stage) + 1:])
        return min(CAPS[stage], left - later)

    def display(self, cmd: list[str], env: dict | None = None) -> str:
        """The command as a person would type it from the repository root."""
        words = ["python" if w == self.py else w.replace(str(ROOT) + "/", "").replace(str(self.work), "$WORK")
                 for w in cmd]
        prefix = [f"{k}={v}" for k, v in (env or {}).items()]
        return shlex.join(prefix + words)

    def start(self, cmd: list[str], env: dict | None = None, log_file: Path | None = None):
        """Starts ``cmd`` in its own process group (so a timeout ends its children too)."""
        full_env = {**self.env, **self.stage_env, **(env or {})}
        out = open(log_file, "w") if log_file else subprocess.PIPE
        proc = subprocess.Popen(cmd, cwd=self.work, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True)
        proc.log_file, proc.t0 = log_file, time.monotonic()
        return proc

    def stop(self, proc, timeout: float) -> tuple[int, bool]:
        """Waits up to ``timeout`` seconds for ``proc``; ends its process group after that.
        Returns (exit status, whether it timed out)."""
        try:
            return proc.wait(timeout=max(timeout, 1)), False
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            return proc.wait(), True

    def run(self, label: str, cmd: list[str], timeout: float, env: dict | None = None) -> dict:
        """Runs ``cmd`` to its end or ``timeout`` seconds; its output goes to the log (and the
        console with --verbose). Returns cmd (as displayed), rc, seconds, timed_out, tail."""
        display = self.display(cmd, {**self.stage_env, **(env or {})})
        self.say(f"{label}: {display}  [budget {timeout:.0f} s]")
        proc = self.start(cmd, env)
        tail: collections.deque = collections.deque(maxlen=40)
        with open(self.log_path, "a") as log:
            log.write(f"===== {label}: {display}\n")
            log.flush()

            def pump():
                for line in proc.stdout:
                    log.write(line)
                    tail.append(line.rstrip())
                    if self.args.verbose:
                        print("    " + line.rstrip(), flush=True)

            reader = threading.Thread(target=pump, daemon=True)
            reader.start()
            rc, timed_out = self.stop(proc, timeout)
            reader.join(timeout=10)
        seconds = time.monotonic() - proc.t0
        last = next((t for t in reversed(tail) if t.strip()), "")
        self.say(f"{label}: {'TIMED OUT after' if timed_out else f'exit {rc} after'} {seconds:.1f} s"
                 + (f"  | {last[:150]}" if last else ""))
        return {"cmd": display, "rc": rc, "seconds": seconds, "timed_out": timed_out, "tail": list(tail)}

    def finish(self, proc, label: str, timeout: float) -> dict:
        """Waits for a background process started with a log file; appends its output to the log."""
        rc, timed_out = self.stop(proc, timeout)
        text = proc.log_file.read_text(errors="replace") if proc.log_file else ""
        with open(self.log_path, "a") as log:
            log.write(f"===== {label}\n{text}")
        seconds = time.monotonic() - proc.t0
        self.say(f"{label}: {'TIMED OUT' if timed_out else f'exit {rc}'} after {seconds:.1f} s")
        return {"rc": rc, "seconds": seconds, "timed_out": timed_out, "tail": text.splitlines()[-20:]}

    def stage(self, name: str, fn) -> None:
        """Runs one stage; an exception or a missing budget is recorded, never raised."""
        budget = self.budget(name)
        t0 = time.monotonic()
        self.say(f"== stage {TITLES[name]} (budget {budget:.0f} s)")
        if budget < 10:
            result = {"status": "skipped", "reason": f"no time left in the {self.args.budget:.0f} s budget"}
        else:
            try:
                result = fn(budget)
            except Exception as err:  # the report must still be written
                result = {"status": "failed", "reason": f"{type(err).__name__}: {err}"}
        result.update(seconds=time.monotonic() - t0, budget=budget)
        self.stages[name] = result
        self.say(f"== stage {name}: {result['status']}" + (f" ({result['reason']})" if result.get("reason") else ""))

    def need_gpu(self) -> dict | None:
        if self.dry or self.info.get("cuda_available"):
            return None
        return {"status": "skipped", "reason": "no CUDA GPU visible (torch.cuda.is_available() is False); "
                "use --dry-run on a machine without one"}

    # ---------------------------------------------------------------------------- stages
    def do_env(self, budget: float) -> dict:
        path = self.work / "env.json"
        r = self.run("env", [self.py, WORKERS, "env", "--json", str(path)], budget)
        self.info = read_json(path)
        self.info["git"] = self.git()
        if not self.dry and self.info.get("capability"):
            # one arch list for every stage: a different one in a later process would rebuild the module
            self.stage_env["TORCH_CUDA_ARCH_LIST"] = self.info["capability"]
        ok = r["rc"] == 0 and self.info.get("torch")
        return {"status": "ok" if ok else "failed", "runs": [r], "info": self.info,
                "reason": None if ok else "the environment probe failed (see the log)"}

    def git(self) -> str:
        try:
            head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                  text=True, timeout=20)
            dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                                   timeout=20)
        except (OSError, subprocess.SubprocessError):
            return "unknown (no git)"
        if head.returncode != 0:
            return "unknown (not a git checkout)"
        changed = len([ln for ln in dirty.stdout.splitlines() if ln.strip()])
        return head.stdout.strip() + (f" + {changed} changed/untracked files" if changed else " (clean)")

    def do_build(self, budget: float) -> dict:
        if (skip := self.need_gpu()) is not None:
            self.stage_env["ABNEXP_KERNELS"] = "torch"
            return skip
        path = self.work / "build.json"
        mode = ["--cpu", "--cached-only"] if self.dry else ["--cuda", "--verbose"]  # compiler output: the log
        r = self.run("build", [self.py, WORKERS, "build", "--json", str(path), *mode], budget)
        info = read_json(path)
        if r["timed_out"] and info.get("build_dir"):
            # torch < 2.12 locks a build with a lock file whose existence blocks every later build
            Path(info["build_dir"], "lock").unlink(missing_ok=True)
        status = info.get("status") if not r["timed_out"] else "timeout"
        # a failed native build leaves that backend out (no second build attempt); the dry run
        # covers the CPU kernels (native), else the reference path: the Triton interpreter is CI's
        self.backends = ([b for b in GPU_BACKENDS if b != "native" or status == "ok"] if not self.dry
                         else ["native" if status == "ok" else "torch"])
        if status != "ok":  # memory and train: the reference path, no second build attempt in their processes
            self.stage_env["ABNEXP_KERNELS"] = "torch"
        reason = info.get("reason") or (f"timed out after {r['seconds']:.0f} s" if r["timed_out"] else None)
        if status not in ("ok", "skipped") and not reason:
            reason = (r["tail"][-1] if r["tail"] else "no output")[:300]
        return {"status": status or "failed", "reason": reason, "runs": [r], "build": info}

    def cuda_test_files(self) -> list[str]:
        """Test files holding CUDA tests (the project's skip reason appears in them)."""
        files = [p for p in sorted((ROOT / "tests").rglob("test_*.py")) if CUDA_SKIP_REASON in p.read_text()]
        return [str(p) for p in files]

    def do_tests(self, budget: float) -> dict:
        if (skip := self.need_gpu()) is not None:
            return skip
        if not self.backends:
            return {"status": "skipped", "reason": "no kernel backend to test (the native build failed; dry run)"}
        files, extra = self.cuda_test_files(), []
        if self.dry:
            for name, test in DRY_CPU_TESTS:
                found = sorted((ROOT / "tests").rglob(name))
                if found:
                    extra.append(f"{found[0]}::{test}")
        end, runs, per, bad = time.monotonic() + budget, [], {}, []
        for i, backend in enumerate(self.backends):
            share = (end - time.monotonic()) / (len(self.backends) - i)
            env = {"ABNEXP_KERNELS": backend}
            check = {"rc": 0, "timed_out": False, "tail": ["skip: the reference path has no operators to check"]} \
                if backend == "torch" else self.run(f"kernels check {backend}", [self.py, "-m", "abnexp", "kernels", "check", "--backend",
                                                          backend, "--device", "cpu" if self.dry else "cuda"],
                             share / 3, env=env)
            junit = self.work / f"junit_{backend}.xml"
            cmd = [self.py, "-m", "pytest", f"--rootdir={ROOT}", "-c", str(ROOT / "pyproject.toml"), "-p",
                   "gpu_check_workers", "-p", "no:cacheprovider", "-v", "-rfE", f"--junitxml={junit}", *files, *extra]
            r = self.run(f"tests {backend}", cmd, end - time.monotonic() if i == len(self.backends) - 1 else share * 2 / 3,
                         env={**env, "ABNEXP_GPU_CHECK_SELECT": "cuda"})
            counts = parse_junit(junit) if junit.is_file() else parse_verbose(r["tail"], self.log_path, f"tests {backend}")
            counts["files"], counts["cpu_tests"] = files, extra
            counts["check"] = {"rc": check["rc"], "timed_out": check["timed_out"],
                               "tail": [t for t in check["tail"] if t.startswith(("FAIL", "ok", "all", "skip"))][-12:]}
            per[backend] = counts
            runs += [check, r] if "cmd" in check else [r]
            ran = counts.get("tests", 0) - counts.get("skipped", 0)
            if r["timed_out"] or check["timed_out"]:
                bad.append(f"{backend}: timed out")
            elif r["rc"] not in (0, 1):
                bad.append(f"{backend}: pytest exit status {r['rc']}: " + (r["tail"][-1] if r["tail"] else ""))
            elif check["rc"] != 0:
                bad.append(f"{backend}: `abnexp kernels check` exit status {check['rc']}: "
                           + (check["tail"][-1] if check["tail"] else ""))
            elif not self.dry and ran == 0:
                bad.append(f"{backend}: every CUDA test was skipped on a GPU machine")
        status = "ok" if not bad else ("timeout" if all("timed out" in b for b in bad) else "failed")
        return {"status": status, "reason": "; ".join(bad) or None, "runs": runs, "per_backend": per}

    def do_bench(self, budget: float) -> dict:
        if (skip := self.need_gpu()) is not None:
            return skip
        end, runs, data, bad = time.monotonic() + budget, [], {"configs": []}, []
        for i, backend in enumerate(self.backends or ["torch"]):
            path = self.work / f"bench_{backend}.json"
            cmd = [self.py, WORKERS, "bench", "--json", str(path)] + (["--dry-run"] if self.dry else [])
            r = self.run(f"bench {backend}", cmd, (end - time.monotonic()) / (len(self.backends or ["torch"]) - i),
                         env={"ABNEXP_KERNELS": backend})
            part = read_json(path)
            data = {**part, "configs": data["configs"] + part.get("configs", [])}
            runs.append(r)
            if r["timed_out"] or r["rc"] != 0:
                bad.append(f"{backend}: " + ("; ".join(part.get("errors", [])) or ("timed out" if r["timed_out"] else
                                                                                  (r["tail"] or ["no output"])[-1])))
        status = "ok" if not bad else ("timeout" if all(r["timed_out"] for r in runs) else "failed")
        return {"status": status, "reason": "; ".join(bad) or None, "runs": runs, "bench": data}

    def do_memory(self, budget: float) -> dict:
        if (skip := self.need_gpu()) is not None:
            return skip
        end = time.monotonic() + budget
        nets, crop = (DRY_MEMORY_NETS, 32) if self.dry else (MEMORY_NETS, 512)
        threads = str(max(1, (os.cpu_count() or 4) // 4))
        planners, rows, runs = {}, [], []
        for _, model in nets:  # the planner on the CPU, all at once, while the GPU measures
            for norm in NORMS:
                common = ["task=semseg", f"model={model}", "model.output_stride=8", f"data.crop_size={crop}",
                          f"norm={norm}"]
                plan = self.work / f"plan_{model}_{norm}.json"
                cmd = [self.py, "-m", "abnexp", "memory", *common, f"memory.device_gb={MEMORY_CAP_GIB}",
                       f"memory.json={plan}"]
                env = {"OMP_NUM_THREADS": threads}  # the GPU stays visible: the cached CUDA build loads
                planners[(model, norm)] = (self.start(cmd, env, self.work / f"plan_{model}_{norm}.log"),
                                           self.display(cmd, {**self.stage_env, **env}), plan)
                rows.append({"model": model, "norm": norm, "overrides": common})
        for i, row in enumerate(rows):
            path = self.work / f"memory_{row['model']}_{row['norm']}.json"
            cmd = [self.py, WORKERS, "memory", "--json", str(path)]
            cmd += ["--fake-oom-above", "3", "--upper", "8"] if self.dry else ["--cap-gib", str(MEMORY_CAP_GIB)]
            share = (end - time.monotonic() - 5) / (len(rows) - i)
            r = self.run(f"memory {row['model']} norm={row['norm']}", [*cmd, "--", *row["overrides"]], share)
            row["measured"] = read_json(path)
            row["measured_cmd"], row["measured_status"] = r["cmd"], (
                "timeout" if r["timed_out"] else "ok" if r["rc"] == 0 else "failed")
            if row["measured_status"] != "ok":
                row["measured_error"] = (r["tail"] or ["no output"])[-1][:300]
            runs.append(r)
        for row in rows:
            proc, display, plan = planners[(row["model"], row["norm"])]
            p = self.finish(proc, f"planner {row['model']} norm={row['norm']}", end - time.monotonic())
            row["plan"], row["plan_cmd"] = read_json(plan), display
            if not row["plan"]:
                row["plan_error"] = "timed out" if p["timed_out"] else (p["tail"] or ["no output"])[-1][:300]
        bad = [f"{r['model']} norm={r['norm']}: {r.get('measured_error') or r['measured_status']}"
               for r in rows if r["measured_status"] != "ok"]
        bad += [f"planner {r['model']} norm={r['norm']}: {r['plan_error']}" for r in rows if r.get("plan_error")]
        status = "ok" if not bad else ("timeout" if any("timeout" in b or "timed out" in b for b in bad) else "failed")
        return {"status": status, "reason": "; ".join(bad) or None, "rows": rows, "runs": runs, "crop": crop}

    def do_train(self, budget: float) -> dict:
        if (skip := self.need_gpu()) is not None:
            return skip
        end = time.monotonic() + budget
        workers = max(2, min(12, (os.cpu_count() or 4) - 2))
        if self.dry:
            common = ["trainer.max_steps=2", "data.batch_size=2", "data.crop_size=64", "data.num_workers=0",
                      "trainer.log_every=1", "device=cpu"]
        else:
            common = ["trainer.max_steps=50", "data.batch_size=64", "data.crop_size=288",
                      f"data.num_workers={workers}", "data.color_jitter=0.0", "data.lighting=0.0",
                      "trainer.log_every=4", "device=cuda"]
        runs, rows = [], []
        for i, norm in enumerate(("inplace_abn", "bn")):
            run_dir = self.work / f"train_{norm}"
            cmd = [self.py, "-m", "abnexp", "train", f"model={'resnet18' if self.dry else 'resnext50'}", f"norm={norm}", "amp=bf16",
                   "channels_last=true", *common, f"hydra.run.dir={run_dir}"]
            r = self.run(f"train norm={norm}", cmd, (end - time.monotonic()) / (2 - i))
            row = {"norm": norm, "cmd": r["cmd"], "seconds": r["seconds"], **throughput(run_dir / "metrics.jsonl")}
            row["status"] = "timeout" if r["timed_out"] else ("ok" if r["rc"] == 0 and row["rows"] else "failed")
            if row["status"] != "ok":
                row["error"] = (r["tail"] or ["no output"])[-1][:300]
            rows.append(row)
            runs.append(r)
        bad = [f"norm={r['norm']}: {r.get('error')}" for r in rows if r["status"] != "ok"]
        status = "ok" if not bad else ("timeout" if any(r["status"] == "timeout" for r in rows) else "failed")
        return {"status": status, "reason": "; ".join(bad) or None, "rows": rows, "runs": runs, "common": common}

    # ---------------------------------------------------------------------------- main
    def main(self) -> int:
        self.say(f"gpu_check{' --dry-run' if self.dry else ''}: work folder {self.work}, budget "
                 f"{self.args.budget:.0f} s, log {self.log_path}")
        for name in ORDER:
            self.stage(name, getattr(self, f"do_{name}"))
        device = self.info.get("device", "unknown device")
        name = "gpu_dry_run.md" if self.dry else f"gpu_{slug(device)}.md"
        if not self.dry and not self.info.get("cuda_available") and not self.args.out:
            self.out = self.work  # a report of skipped stages does not belong in results/
        self.out.mkdir(parents=True, exist_ok=True)
        report = self.out / name
        report.write_text(render(self))
        (self.logs / (Path(name).stem + ".json")).write_text(json.dumps(
            {"info": self.info, "stages": self.stages}, indent=1, default=str) + "\n")
        self.say(f"wrote {report} (raw figures: {self.logs / (Path(name).stem + '.json')}, log: {self.log_path})")
        failed = [n for n, s in self.stages.items() if s["status"] not in ("ok", "skipped")]
        if failed:
            self.say(f"stages not ok: {', '.join(failed)}")
        return 1 if failed or (not self.dry and not self.info.get("cuda_available")) else 0


# ------------------------------------------------------------------------------------- parsing
def parse_junit(path: Path) -> dict:
    """Counts (tests, passed, failures, errors, skipped), the failing tests with their first
    message line, skip reasons and tests per module from pytest's JUnit XML."""
    root = ET.parse(path).getroot()
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "failed": [], "skip_reasons": {},
              "per_module": {}, "source": "junit"}
    for case in root.iter("testcase"):
        counts["tests"] += 1
        module = case.get("classname", "?")
        counts["per_module"][module] = counts["per_module"].get(module, 0) + 1
        name = f"{module}::{case.get('name')}"
        for kind, key in (("failure", "failures"), ("error", "errors")):
            for el in case.findall(kind):
                counts[key] += 1
                counts["failed"].append(f"{name}: {(el.get('message') or '').splitlines()[0][:200] if el.get('message') else kind}")
        for el in case.findall("skipped"):
            counts["skipped"] += 1
            reason = (el.get("message") or "").strip()[:120]
            counts["skip_reasons"][reason] = counts["skip_reasons"].get(reason, 0) + 1
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def parse_verbose(tail: list[str], log_path: Path, label: str = "tests") -> dict:
    """The same counts from pytest's -v lines in the log (when it was stopped before the XML)."""
    text = log_path.read_text(errors="replace")
    text = text[text.rfind(f"===== {label}:"):]
    results = re.findall(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR)", text, re.M)
    seen = dict(results)
    values = list(seen.values())
    return {"tests": len(seen), "passed": values.count("PASSED"), "failures": values.count("FAILED"),
            "errors": values.count("ERROR"), "skipped": values.count("SKIPPED"),
            "failed": [k for k, v in seen.items() if v in ("FAILED", "ERROR")], "skip_reasons": {},
            "per_module": {}, "source": "pytest -v output (stopped before the JUnit XML)"}


def throughput(metrics: Path) -> dict:
    """images/s of a run: the median over its train log windows, leaving out each epoch's first
    window (DataLoader start, cuDNN autotuning, first-call costs) when others remain."""
    try:
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return {"rows": []}
    train = [r for r in rows if r.get("split") == "train"]
    steady = [r for i, r in enumerate(train) if i > 0 and r.get("epoch") == train[i - 1].get("epoch")]
    used = steady or train
    out = {"rows": train, "windows": len(used), "steady": bool(steady)}
    if used:
        out["images_per_s"] = statistics.median(r["images_per_s"] for r in used)
        out["peak_memory_bytes"] = max(r.get("peak_memory_bytes", 0) for r in train)
        out["last_loss"] = train[-1].get("loss")
        out["last_step"] = train[-1].get("step")
    return out


# ------------------------------------------------------------------------------------- report
def verdict(ok: bool | None, dry: bool) -> str:
    if dry:
        return "n/a (dry run on CPU: not a GPU figure)"
    return "not measured" if ok is None else ("**met**" if ok else "**NOT met**")


def fmt_status(s: dict) -> str:
    text = s.get("status", "?")
    return text + (f": {s['reason']}" if s.get("reason") else "")


def commands_block(cmds: list[str]) -> list[str]:
    return ["```", *cmds, "```"] if cmds else []


def render(check: Check) -> str:
    """The markdown report."""
    st, info, dry = check.stages, check.info, check.dry
    device = info.get("device", "unknown device")
    argv = " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [f"# GPU validation pack: {device}{' (DRY RUN on CPU: no figure here is a GPU measurement)' if dry else ''}",
             "",
             f"Command: `bash scripts/gpu_check.sh{(' ' + argv) if argv else ''}`, started "
             f"{check.started:%Y-%m-%d %H:%M %Z}, {check.elapsed():.0f} s of wall time (budget "
             f"{check.args.budget:.0f} s). The commands below run from the repository root with scripts/ on "
             f"PYTHONPATH; `$WORK` is the work folder ({check.work}), `python` is {check.py}. Raw figures and "
             f"every command's output: `gpu_*.json` and `gpu_check.log` in {check.logs}.", ""]
    # environment
    mem = info.get("total_memory_bytes")
    lines += [f"## {TITLES['env']}", "", "| | |", "|---|---|"]
    for key, label in (("device", "device"), ("capability", "compute capability"), ("driver", "driver"),
                       ("torch_cuda", "CUDA (torch built with)"), ("nvcc", "CUDA toolkit (nvcc)"),
                       ("cudnn", "cuDNN"), ("nccl", "NCCL"), ("torch", "torch"), ("torchvision", "torchvision"),
                       ("hydra", "hydra-core"), ("python", "Python"), ("cpu_count", "CPU cores"),
                       ("git", "git commit")):
        if key in info:
            lines.append(f"| {label} | {info[key]} |")
    if mem:
        lines.append(f"| GPU memory | {mem / 2**30:.1f} GiB |")
    lines += [""]
    lines += goals(check)
    lines += section_build_tests(check)
    lines += section_bench(check)
    lines += section_memory(check)
    lines += section_train(check)
    lines += ["## Stages", "", "| stage | status | seconds | budget s |", "|---|---|---|---|"]
    for name in ORDER:
        s = st.get(name, {"status": "not run"})
        lines.append(f"| {TITLES[name]} | {fmt_status(s)[:400]} | {s.get('seconds', 0):.0f} | {s.get('budget', 0):.0f} |")
    return "\n".join(lines) + "\n"


def speed_summary(bench: dict):
    """(worst InPlace-ABN / torch ratio, where, how many configs met the goal, of how many)."""
    ratios = [(r["x_torch"], f"{c.get('backend')} {'x'.join(map(str, c['shape']))} {c['dtype']} {c['layout']} {r['variant']}")
              for c in bench.get("configs", []) for r in c["fwd_bwd"] if r["variant"].startswith("InPlace")]
    if not ratios:
        return None
    worst = max(ratios)
    return worst, sum(x <= GOAL_SPEED for x, _ in ratios), len(ratios)


def bandwidth_summary(bench: dict):
    fr = [(b["x_copy"], f"{c.get('backend')} {b['kernel']} {'x'.join(map(str, c['shape']))} {c['dtype']} {c['layout']}")
          for c in bench.get("configs", []) for b in c.get("bandwidth", []) if not b["kernel"].startswith("copy")]
    return min(fr) if fr else None


def memory_ratios(rows: list[dict]) -> dict:
    """{model: {kept, peak, batch}: InPlace-ABN / BN ratios} of the memory rows."""
    out = {}
    by = {(r["model"], r["norm"]): r.get("measured", {}) for r in rows}
    for model in {r["model"] for r in rows}:
        bn, ip = by.get((model, "bn"), {}), by.get((model, "inplace_abn"), {})
        out[model] = {k: (ip[k] / bn[k] if bn.get(k) and ip.get(k) is not None else None)
                      for k in ("kept_bytes_per_crop", "peak_bytes_per_crop", "max_batch")}
    return out


def goals(check: Check) -> list[str]:
    st, dry = check.stages, check.dry
    lines = ["## Goals", "", "| goal | measured | met? |", "|---|---|---|"]
    bench = st.get("bench", {}).get("bench", {})
    sp = speed_summary(bench)
    lines.append(f"| InPlace-ABN I/II forward + backward ≤ {GOAL_SPEED:.2f}× torch BatchNorm2d + F.leaky_relu_ "
                 f"(paper: +0.8–2 %) | " + (f"worst {sp[0][0]:.3f}× ({sp[0][1]}); {sp[1]} of {sp[2]} configurations "
                                            f"within" if sp else "no figure") +
                 f" | {verdict(None if not sp else sp[0][0] <= GOAL_SPEED, dry)} |")
    bw = bandwidth_summary(bench)
    lines.append(f"| statistics and forward kernels ≥ {GOAL_BANDWIDTH:.0%} of copy bandwidth (each backend) | " +
                 (f"lowest {bw[0]:.0%} ({bw[1]})" if bw else "no figure") +
                 f" | {verdict(None if not bw else bw[0] >= GOAL_BANDWIDTH, dry)} |")
    rows = st.get("memory", {}).get("rows", [])
    ratios = memory_ratios(rows)
    kept = [v["kept_bytes_per_crop"] for v in ratios.values()]
    peak = [v["peak_bytes_per_crop"] for v in ratios.values()]
    text = "; ".join(f"{m}: kept {_r(v['kept_bytes_per_crop'])}, peak {_r(v['peak_bytes_per_crop'])}"
                     for m, v in sorted(ratios.items())) or "no figure"
    kept_ok = None if not kept or None in kept else max(kept) <= GOAL_MEMORY
    peak_ok = None if not peak or None in peak else max(peak) <= GOAL_MEMORY
    lines.append(f"| memory per crop of InPlace-ABN ≤ {GOAL_MEMORY:.2f}× std-BN's (DeepLabV3, OS 8, 512²) | {text} "
                 f"| bytes kept for backward: {verdict(kept_ok, dry)}; peak allocation: {verdict(peak_ok, dry)} |")
    for backend, counts in st.get("tests", {}).get("per_backend", {}).items():
        bad = counts.get("failures", 0) + counts.get("errors", 0)
        ran = counts.get("tests", 0) - counts.get("skipped", 0)
        tests_ok = None if counts["check"]["timed_out"] or ran == 0 else bad == 0 and counts["check"]["rc"] == 0
        lines.append(f"| ABNEXP_KERNELS={backend}: no CUDA test failing, `abnexp kernels check` passes | "
                     f"{counts.get('passed', 0)} passed, {bad} failed/errors, {counts.get('skipped', 0)} skipped; "
                     f"check exit {counts['check']['rc']} | {verdict(tests_ok, dry)} |")
    return lines + [""]


def _r(x) -> str:
    return "-" if x is None else f"{x:.2f}×"


def section_build_tests(check: Check) -> list[str]:
    st = check.stages
    b = st.get("build", {})
    info = b.get("build", {})
    lines = [f"## {TITLES['build']}", "", f"Status: {fmt_status(b)}.", ""]
    lines += commands_block([r["cmd"] for r in b.get("runs", [])])
    if info.get("status") == "ok":
        archs = ", ".join(f"sm_{a.replace('.', '')}" for a in info.get("cuda_archs", [])) or "none"
        lines += ["", f"Built `{info.get('name')}` ({'CPU + CUDA' if info.get('cuda') else 'CPU only'}; CUDA archs "
                  f"{archs}) in {info.get('seconds', 0):.1f} s (a cached build only reloads): `{info.get('library')}`."
                  + (f" CUDA tensors use the native kernels: {info.get('cuda_kernels_serve_cuda')}."
                     if "cuda_kernels_serve_cuda" in info else "")]
    if check.stage_env.get("ABNEXP_KERNELS") == "torch":
        lines += ["", "The native module was not built here: the tests and benchmarks below cover "
                  f"{', '.join(check.backends) or 'no kernel backend'} only, and the memory and training stages ran "
                  "with `ABNEXP_KERNELS=torch` (the PyTorch reference path of the layers; their InPlace-ABN figures "
                  "are not the kernels')."]
    t = st.get("tests", {})
    lines += ["", f"## {TITLES['tests']}", "", f"Status: {fmt_status(t)}.", ""]
    lines += commands_block([r["cmd"] for r in t.get("runs", [])])
    for backend, c in t.get("per_backend", {}).items():
        lines += ["", f"### `ABNEXP_KERNELS={backend}`", "",
                  f"`abnexp kernels check --backend {backend}`: exit {c['check']['rc']}"
                  + (" (timed out)" if c["check"]["timed_out"] else "") + "; its summary lines:", ""]
        lines += commands_block(c["check"]["tail"])
        lines += ["", f"Tests selected: those skipped with \"{CUDA_SKIP_REASON}\" when no GPU is visible (pytest "
                  f"plugin `-p gpu_check_workers`, `ABNEXP_GPU_CHECK_SELECT=cuda`) in "
                  f"{', '.join(f'`{Path(f).relative_to(ROOT)}`' for f in c.get('files', []))}"
                  + (f"; plus the CPU tests {', '.join(f'`{Path(x).name}`' for x in c['cpu_tests'])} (dry run)"
                     if c.get("cpu_tests") else "") + f". Counts from {c.get('source')}.", "",
                  "| tests | passed | failed | errors | skipped |", "|---|---|---|---|---|",
                  f"| {c.get('tests', 0)} | {c.get('passed', 0)} | {c.get('failures', 0)} | {c.get('errors', 0)} "
                  f"| {c.get('skipped', 0)} |", ""]
        if c.get("per_module"):
            lines += ["Per module: " + ", ".join(f"`{m}` {n}" for m, n in sorted(c["per_module"].items())) + ".", ""]
        if c.get("failed"):
            lines += ["Failing:", ""] + [f"- `{f}`" for f in c["failed"][:40]] + [""]
        if c.get("skip_reasons"):
            lines += ["Skip reasons: " + "; ".join(f"{n}× {r!r}" for r, n in c["skip_reasons"].items()) + ".", ""]
    return lines + [""]


def section_bench(check: Check) -> list[str]:
    s = check.stages.get("bench", {})
    data = s.get("bench", {})
    lines = [f"## {TITLES['bench']}", "", f"Status: {fmt_status(s)}.", ""]
    lines += commands_block([r["cmd"] for r in s.get("runs", [])])
    if not data.get("configs"):
        return lines + [""]
    timer = "CUDA events" if data.get("device") == "cuda" else "time.perf_counter (CPU)"
    lines += ["", f"Training mode, LeakyReLU slope {data.get('slope')}; inputs and gradients in the listed dtype "
              "(bfloat16: bf16 tensors, float32 parameters and statistics, no autocast); one forward + backward "
              f"per call with an explicit gradient; {timer}, median of {data.get('repeats')} calls after "
              f"{data.get('warmup')} warm-up, the three candidates interleaved"
              + ("; a 256 MiB buffer is written before every timed call so that operands come from memory, "
                 "not L2" if data.get("device") == "cuda" else "") + ". × = time / torch's. "
              "torch's layer: `nn.BatchNorm2d(C)` then `F.leaky_relu_(y, 0.01)` (cuDNN or torch's own CUDA kernel, "
              "whichever torch picks: kernel names below).", "",
              "| backend | shape | dtype | layout | torch BN + leaky_relu_ ms | InPlace-ABN I ms (×) | InPlace-ABN II ms (×) |",
              "|---|---|---|---|---|---|---|"]
    for c in data["configs"]:
        r = {x["variant"]: x for x in c["fwd_bwd"]}
        t = r.get("torch BatchNorm2d + F.leaky_relu_", {})
        cells = [f"{r[v]['ms']:.3f} ({r[v]['x_torch']:.3f}×)" if v in r else "-" for v in ("InPlace-ABN I", "InPlace-ABN II")]
        lines.append(f"| {c.get('backend')} | {'×'.join(map(str, c['shape']))} | {c['dtype']} | {c['layout']} | "
                     f"{t.get('ms', 0):.3f} | {cells[0]} | {cells[1]} |")
    lines += ["", "Achieved bandwidth = bytes the operator must move at least (statistics: read x once; forward, "
              "forward_ and the copy: read x + write the output) / median time, in GB/s (1e9 B/s); × copy = "
              "fraction of a device-to-device `copy_` of the same tensor.", "",
              "| backend | shape | dtype | layout | copy GB/s | statistics GB/s (× copy) | forward GB/s (× copy) "
              "| forward_ GB/s (× copy) |", "|---|---|---|---|---|---|---|---|"]
    for c in data["configs"]:
        bw = {b["kernel"]: b for b in c.get("bandwidth", [])}
        row = f"| {c.get('backend')} | {'×'.join(map(str, c['shape']))} | {c['dtype']} | {c['layout']} | "
        if not bw:
            lines.append(row + f"{c.get('bandwidth_note', '-')} | | | |")
            continue
        cell = lambda k: f"{bw[k]['GBps']:.0f} ({bw[k]['x_copy']:.2f})" if k in bw else "-"  # noqa: E731
        lines.append(row + f"{bw['copy_ (device to device)']['GBps']:.0f} | {cell('statistics')} | "
                     f"{cell('forward')} | {cell('forward_ (in place)')} |")
    kernels = {f"{c['dtype']} {c['layout']}": c["torch_bn_kernels"] for c in data["configs"] if c.get("torch_bn_kernels")}
    if kernels:
        lines += ["", "Kernels of torch's BN + leaky_relu_ forward + backward (first shape, torch.profiler):", ""]
        lines += [f"- {k}: {', '.join(f'`{n}`' for n in v)}" for k, v in kernels.items()]
    return lines + [""]


def section_memory(check: Check) -> list[str]:
    s = check.stages.get("memory", {})
    rows = s.get("rows", [])
    lines = [f"## {TITLES['memory']}", "", f"Status: {fmt_status(s)}.", ""]
    if not rows:
        return lines + [""]
    crop = s.get("crop")
    cap = "no cap (dry run: batches above 3 raise a simulated out-of-memory error)" if check.dry else (
        f"`torch.cuda.set_per_process_memory_fraction({MEMORY_CAP_GIB} GiB / total)` in each measuring process")
    lines += [f"DeepLabV3 (`task=semseg`, `model.output_stride=8`), {crop}² crops, float32, training mode; memory: {cap}. "
              "*max batch* = largest batch whose training step (forward, mean of the logits, backward, SGD momentum "
              "update: the step of `memory.measure=true`) allocates without running out, by doubling from 2 then "
              "bisecting (batch 1 cannot train: the head's pooled branch normalizes one value per channel). "
              "*kept* = bytes autograd keeps for backward per crop (abnexp.memory.SavedBytes at batch 2, on the "
              "measuring device); *peak/crop* = slope of `torch.cuda.max_memory_allocated` between the smallest and "
              "largest batch that fit. *planner* = `abnexp memory` (the whole step simulated on fake tensors on the CPU "
              "and replayed through its caching-allocator model; largest batch on a 12 GiB device less its reserve; "
              "*planner MiB/crop*: its allocated peak's growth per crop). Paper = InPlace-ABN Table 3, "
              "Cityscapes, crops per GPU.", "",
              "| network | norm | max batch (measured) | paper | planner max batch | kept MiB/crop | planner MiB/crop "
              "| peak MiB/crop | probes (batch: fits) |", "|---|---|---|---|---|---|---|---|---|"]
    names = dict(MEMORY_NETS + DRY_MEMORY_NETS)
    names = {v: k for k, v in names.items()}
    for r in rows:
        m, p = r.get("measured", {}), r.get("plan", {})
        probes = " ".join(f"{x['batch']}:{'y' if x['fits'] else 'n'}" for x in m.get("probes", []))
        paper = TABLE3_PAPER.get(r["model"], {}).get(r["norm"], "-")
        fitted = [x["batch"] for x in m.get("probes", []) if x["fits"]]
        maxb = m.get("max_batch", f"≥ {max(fitted)} (search stopped: {r.get('measured_status')})" if fitted
                     else r.get("measured_error", r.get("measured_status")))
        lines.append(f"| {names.get(r['model'], r['model'])} | {r['norm']} | {maxb} | {paper} | "
                     f"{p.get('max_batch', r.get('plan_error', '-'))} | {mib(m.get('kept_bytes_per_crop'))} | "
                     f"{mib(p.get('per_crop_bytes'))} | {mib(m.get('peak_bytes_per_crop'))} | {probes} |")
    lines += ["", "| network | kept InPlace-ABN / BN | peak per crop InPlace-ABN / BN | max batch InPlace-ABN / BN "
              "(paper) |", "|---|---|---|---|"]
    for model, v in sorted(memory_ratios(rows).items()):
        paper = TABLE3_PAPER.get(model)
        lines.append(f"| {names.get(model, model)} | {_r(v['kept_bytes_per_crop'])} | {_r(v['peak_bytes_per_crop'])} | "
                     f"{_r(v['max_batch'])} ({_r(paper['inplace_abn'] / paper['bn']) if paper else '-'}) |")
    lines += ["", "Commands (one per row; the planner ran on the CPU beside the measurements):", ""]
    lines += commands_block([c for r in rows for c in (r.get("measured_cmd"), r.get("plan_cmd")) if c])
    return lines + [""]


def section_train(check: Check) -> list[str]:
    s = check.stages.get("train", {})
    rows = s.get("rows", [])
    lines = [f"## {TITLES['train']}", "", f"Status: {fmt_status(s)}.", ""]
    if not rows:
        return lines + [""]
    lines += [f"{'ResNet-18 (dry run)' if check.dry else 'ResNeXt-50'} on the demo data (64×64 photographs of 10 classes, upsampled by RandomResizedCrop to "
              "`data.crop_size`; colour jitter and lighting off so that the CPU loaders keep up), `amp=bf16 "
              "channels_last=true`, same seed and settings for both norms. images/s = the median over the "
              "`metrics.jsonl` train windows (`trainer.log_every` steps each) other than each epoch's first "
              "(DataLoader start and first-call costs); peak = `peak_memory_bytes` (torch.cuda.max_memory_allocated).",
              "", "| norm | images/s | windows | peak GiB | last loss (step) | wall s |", "|---|---|---|---|---|---|"]
    for r in rows:
        ips = f"{r['images_per_s']:.1f}" if "images_per_s" in r else r.get("error", "-")
        peak = f"{r['peak_memory_bytes'] / 2**30:.2f}" if r.get("peak_memory_bytes") else "-"
        loss = f"{r['last_loss']:.4f} ({r['last_step']})" if r.get("last_loss") is not None else "-"
        lines.append(f"| {r['norm']} | {ips} | {r.get('windows', 0)}{'' if r.get('steady', True) else ' (all)'} | "
                     f"{peak} | {loss} | {r['seconds']:.0f} |")
    by = {r["norm"]: r for r in rows}
    if "images_per_s" in by.get("bn", {}) and "images_per_s" in by.get("inplace_abn", {}):
        ratio = by["inplace_abn"]["images_per_s"] / by["bn"]["images_per_s"]
        lines += ["", f"InPlace-ABN / BN throughput: {ratio:.3f} (the paper: InPlace-ABN costs +0.8–2 % time)."]
    lines += ["", "Commands:", ""] + commands_block([r["cmd"] for r in rows])
    return lines + [""]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="every stage on the CPU on tiny inputs; never writes results/")
    p.add_argument("--out", help="folder of the report (default results/; with --dry-run the work folder)")
    p.add_argument("--logs", help="folder of gpu_check.log and the raw JSON (default the work folder)")
    p.add_argument("--work", help="work folder: run dirs, JSON, JUnit XML (default a new temporary folder)")
    p.add_argument("--budget", type=float, default=None,
                   help="wall-clock seconds for all stages (default 540: 9.5 minutes with the set-up; dry run 510)")
    p.add_argument("--verbose", action="store_true", help="echo every subprocess's output")
    args = p.parse_args(argv)
    args.budget = args.budget or (510.0 if args.dry_run else 540.0)
    if args.dry_run and args.out and Path(args.out).resolve().is_relative_to((ROOT / "results").resolve()):
        p.error("--dry-run never writes to results/: give another --out")
    return Check(args).main()


if __name__ == "__main__":
    sys.exit(main())
