"""Training-throughput benchmark: the DERM model on TorchRec (DMP, fused row-wise Adagrad) next to a
plain-PyTorch baseline of the same model, on 1 and 2 CPU ranks (gloo).

Both paths train the same ``DERMModel`` (``modules/derm.py``) of the ctr source of the ``small``
synthetic world on the same batches; only the embedding collections and their optimizer differ:

- ``torchrec``: ``build_derm(..., embedding_device=meta)`` + ``sharding.dmp.shard_model``: the
  planner shards the tables over the ranks, FBGEMM's fused row-wise Adagrad updates them inside
  the backward pass, the dense parts are data-parallel (DDP inside DMP), dense Adam.
- ``baseline``: the same model with its ``ebc``/``ec`` replaced by ``bench/plain_embeddings.py``
  (``nn.EmbeddingBag(sparse=True)`` / ``nn.Embedding(sparse=True)``, same table configs, same
  outputs), tables updated by ``torch.optim.Adagrad`` on their sparse gradients (the nearest plain
  optimizer to row-wise Adagrad: it keeps one accumulator per *element*, not per row), dense Adam;
  on 2 ranks the whole model is replicated and wrapped in DDP, which all-reduces the dense gradients
  and, with gloo, the sparse ones (as sparse tensors).

Model configs (``--configs``):

- ``default``: ``DERMConfig()`` (token_dim 32, two DHEN layers per tower) on the world's own spec
  (12 pooled tables of 3-22,400 rows, widths 4-16; one sequence table of 6,500 x 16).
- ``heavy``: embedding-heavy. The spec's ``user_id`` table grows to 2,000,000 x 128, ``pin_id`` and
  the ``seq_pin`` sequence table to 1,000,000 x 128, and four pooled id-list features are added
  (``user_seq_bag_0..3``: each the ``seq_pin_ids`` column, mean-pooled, ~25 ids a row, its own
  250,000 x 128 table; a stand-in for the several engaged-Pin lists per action and window a real log
  has, which the synthetic world does not generate). A row then looks up ~127 rows of width 128
  (2 single ids, 4 x ~25 pooled, ~25 unpooled) against ~30 rows of width 4-16 in ``default``. The
  dense part is lighter: token_dim 16, one DHEN layer (mlp + mlp, hidden 64) per tower, heads (16,);
  the sequence encoder (1 transformer layer) stays. The world holds 20,000 users and 5,000 Pins, so
  a batch touches at most those rows of the big tables: table size shows in memory and optimizer
  state, ids per row in the lookup work.

Method. Every rank is its own process (peak RSS from ``os.wait4``; the table shows the largest
rank's). Each rank first loads ``--warmup + --steps`` batches of ``--batch-size`` rows (its shard of
the stream) into memory, so the loader is not measured. Both paths of a configuration are built side
by side and then stepped in turns (a baseline step, a TorchRec step, ...; the idle one waits on a
pipe), so they share the machine's conditions. Warm-up steps are dropped. The machine is shared, so
a measured step counts only if the rest of the machine used at most 10 % of its CPU meanwhile
(``/proc/stat`` minus our processes' ticks); after a disturbed step the next one waits for a quiet
machine (at most ``--max-wait`` s per configuration), and steps go on until each path has
``--steps`` quiet ones (at most three times that many steps; with fewer than half of ``--steps``
quiet ones a path's median is over all its steps, marked ``noisy``). examples/s = ranks x batch / the median step time (a step's time
is its slowest rank's). The embedding/dense split comes from timed hooks, not the profiler:
embedding = the collections' forward (pre-hook to hook, waiting there for a sharded module's output
all-to-all) + the backward from the first gradient reaching a collection's output to the end of
``loss.backward()`` (the lookups' backward, TorchRec's fused update, the gradient all-to-alls, and
DDP's final wait for its all-reduces) + the baseline's sparse Adagrad step; dense = the rest (dense
forward and backward, loss, Adam). Threads: 1 rank runs with torch's default thread count (all
cores); 2 ranks with one thread per rank (OMP_NUM_THREADS=1, as torchrun sets).

Usage::

    python bench/bench_train.py                                  # generates `small`; ~5 min on a quiet machine
    python bench/bench_train.py --data runs/data/small           # reuse a generated small world
    python bench/bench_train.py --configs default --ranks 1 --steps 3 --warmup 1 --batch-size 256  # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "ctr"
HEAVY_DIM = 128
HEAVY_ROWS = {"user_id": 2_000_000, "pin_id": 1_000_000, "seq_pin": 1_000_000}
"""Rows of the embedding-heavy config's grown tables (``seq_pin`` is the sequence table)."""
HEAVY_BAGS = 4
"""Pooled id-list features over the sequence column that the embedding-heavy config adds."""
HEAVY_BAG_ROWS = 250_000
PATHS = ("baseline", "torchrec")
QUIET_SHARE = 0.1
"""A measured step counts if the rest of the machine used at most this share of its CPU meanwhile."""
MAX_TRIES = 3
"""Measured steps per path stop at this multiple of ``--steps``, quiet or not."""
SPARSE_LR = 0.05  # OptimizerConfig's defaults, used by both paths
DENSE_LR = 1e-3


# ---- model configs (built inside the rank processes) ----------------------------------------------
def _model_config(name: str):
    from modules.config import DERMConfig, DHENConfig

    if name == "default":
        return DERMConfig()
    light = DHENConfig(layers=(("mlp", "mlp"),), mlp_hidden=64)
    return DERMConfig(
        token_dim=16, user_dhen=light, pin_dhen=light, interaction_dhen=dataclasses.replace(light, out_tokens=2), head_hidden=(16,)
    )


def _spec(name: str, data: str):
    """The world's spec, or its embedding-heavy variant (see the module docstring)."""
    from trainer.data.spec import SparseFeature, load_spec

    spec = load_spec(Path(data) / "spec.toml")
    if name == "default":
        return spec
    grow = lambda f, rows: dataclasses.replace(f, num_embeddings=rows, embedding_dim=HEAVY_DIM)  # noqa: E731
    sparse = [grow(f, HEAVY_ROWS[f.name]) if f.name in HEAVY_ROWS else f for f in spec.sparse]
    seq = next(f for f in spec.sequence if f.table == "seq_pin")
    sparse += [
        SparseFeature(
            name=f"user_seq_bag_{i}", tower="user", num_embeddings=HEAVY_BAG_ROWS, embedding_dim=HEAVY_DIM,
            column=seq.column, multi=True, pooling="mean", sources=seq.sources,
        )
        for i in range(HEAVY_BAGS)
    ]
    sequence = [grow(f, HEAVY_ROWS["seq_pin"]) if f.table == "seq_pin" else f for f in spec.sequence]
    return dataclasses.replace(spec, sparse=tuple(sparse), sequence=tuple(sequence))


# ---- timing hooks -------------------------------------------------------------------------------
class EmbeddingTimer:
    """Times the embedding collections inside a step with module and tensor hooks (see the module
    docstring for what counts as embedding time)."""

    def __init__(self, modules) -> None:
        self.forward = 0.0
        self.first_grad: float | None = None
        self._start = 0.0
        for m in modules:
            m.register_forward_pre_hook(self._before)
            m.register_forward_hook(self._after)

    def reset(self) -> None:
        self.forward, self.first_grad = 0.0, None

    def _before(self, module, args) -> None:
        self._start = time.perf_counter()

    def _after(self, module, args, out):
        from torchrec.distributed.types import LazyAwaitable
        from torchrec.sparse.jagged_tensor import KeyedTensor

        if isinstance(out, LazyAwaitable):  # a sharded module: wait for its output all-to-all here
            out = out.wait()
        self.forward += time.perf_counter() - self._start
        tensors = [out.values()] if isinstance(out, KeyedTensor) else [jt.values() for jt in out.values()]
        for t in tensors:
            if t.requires_grad:
                t.register_hook(self._grad)
        return out

    def _grad(self, grad) -> None:
        if self.first_grad is None:
            self.first_grad = time.perf_counter()


# ---- one rank of one path ----------------------------------------------------------------------
def _build(job: dict):
    """This rank's model, optimizers and in-memory batches for ``job``; -> (step function, info)."""
    import itertools

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from bench.plain_embeddings import PlainEmbeddingBagCollection, PlainEmbeddingCollection
    from modules.derm import build_derm
    from sharding.collectives import all_gather_ids
    from sharding.dmp import OptimizerConfig, shard_model
    from trainer.data.loader import make_loader

    world, rank = job["world"], job["rank"]
    if world > 1:
        torch.set_num_threads(1)
    torch.manual_seed(0)
    # shard_model needs a group, also for 1 rank; the ranks meet through a file store (no port to race for)
    dist.init_process_group("gloo", init_method=f"file://{job['store']}", rank=rank, world_size=world)
    cpu = torch.device("cpu")
    spec = _spec(job["config"], job["data"])
    loader = make_loader(job["data"], SOURCE, batch_size=job["batch"], rank=rank, world_size=world, spec=spec)
    batches = list(itertools.islice(loader, job["batches"]))  # in memory first: the loader is not measured
    if len(batches) < job["batches"]:
        raise SystemExit(f"the data holds only {len(batches)} batches of {job['batch']} per rank")

    gather = all_gather_ids() if world > 1 else None
    task = build_derm(spec, SOURCE, _model_config(job["config"]), device=cpu, embedding_device=torch.device("meta"), gather=gather)
    plan = {}
    if job["path"] == "torchrec":
        model, optimizer = shard_model(task, cpu, OptimizerConfig(sparse_lr=SPARSE_LR, dense_lr=DENSE_LR))
        collections = [model.module.model.ebc, model.module.model.ec]
        plan = {t: p.sharding_type for tables in model.plan.plan.values() for t, p in tables.items()}
        sparse_opt, dense_opt = None, optimizer  # the tables' update is fused into the backward pass
    else:
        task.model.ebc = PlainEmbeddingBagCollection(task.model.ebc.embedding_bag_configs(), device=cpu)
        task.model.ec = PlainEmbeddingCollection(task.model.ec.embedding_configs(), device=cpu)
        collections = [task.model.ebc, task.model.ec]
        tables = {id(p) for m in collections for p in m.parameters()}
        sparse_opt = torch.optim.Adagrad([p for m in collections for p in m.parameters()], lr=SPARSE_LR)
        dense_opt = torch.optim.Adam([p for p in task.parameters() if id(p) not in tables], lr=DENSE_LR)
        # As DMP wraps its dense part: no buffer broadcast (the estimator is kept equal by gathering ids).
        model = DistributedDataParallel(task, broadcast_buffers=False, gradient_as_bucket_view=True) if world > 1 else task
    optimizers = [o for o in (sparse_opt, dense_opt) if o is not None]
    timer = EmbeddingTimer(collections)
    batch_cycle = itertools.cycle(batches)

    def step() -> dict:
        batch = next(batch_cycle)
        t0 = time.perf_counter()
        timer.reset()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss, _ = model(batch)
        loss.backward()
        t1 = time.perf_counter()
        sparse_step = 0.0
        if sparse_opt is not None:
            sparse_opt.step()
            sparse_step = time.perf_counter() - t1
        dense_opt.step()
        t2 = time.perf_counter()
        if not torch.isfinite(loss):
            raise SystemExit(f"loss is {loss.item()}")
        return {"step": t2 - t0, "embedding": timer.forward + (t1 - timer.first_grad) + sparse_step}

    return step, {"threads": torch.get_num_threads(), "plan": plan}


def _child(job: dict) -> None:
    """A rank process. Talks to the parent in lines: ``ready {info}`` once built, then for each
    ``go`` it reads, one step and ``done {timings}``; ``stop`` ends it."""
    import torch.distributed as dist

    from trainer.log import setup_logging

    setup_logging()
    step, info = _build(job)
    print("ready", json.dumps(info), flush=True)
    while (line := sys.stdin.readline().strip()) == "go":
        print("done", json.dumps(step()), flush=True)
    if line != "stop":
        raise SystemExit("the benchmark parent went away")
    dist.barrier()
    dist.destroy_process_group()


# ---- the parent: both paths' rank processes, stepped in turns, quiet steps kept -------------------

def _cpu_ticks(pids: list[int]) -> tuple[int, int]:
    """(busy clock ticks of the whole machine, ticks of ``pids`` and this process), from /proc."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    ours = 0
    for pid in [*pids, os.getpid()]:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ours += int(fields[11]) + int(fields[12])  # utime, stime (all threads)
    return user + nice + system + irq + softirq + steal, ours


class _Group:
    """The rank processes of one path of one configuration."""

    def __init__(self, job: dict, tmp: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.pop(var, None)
        if job["world"] > 1:  # as torchrun: one thread per rank
            env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        name = f"{job['config']}-{job['path']}-{job['world']}"
        fd, store = tempfile.mkstemp(prefix=f"{name}-", suffix=".store", dir=tmp)  # empty and new: a file store
        os.close(fd)
        job = {**job, "store": store}
        self.job, self.procs, self.logs, self.steps = job, [], [], []
        for rank in range(job["world"]):
            self.logs.append(tmp / f"{name}-{rank}.log")
            args = [sys.executable, __file__, "--child", json.dumps({**job, "rank": rank})]
            with open(self.logs[-1], "w") as log:
                self.procs.append(
                    subprocess.Popen(args, env=env, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
                )

    def _say(self, word: str) -> None:
        for proc in self.procs:
            proc.stdin.write(word + "\n")
            proc.stdin.flush()

    def _expect(self, word: str) -> list[dict]:
        """Each rank's next ``word {json}`` line."""
        answers = []
        for rank, proc in enumerate(self.procs):
            while (line := proc.stdout.readline()) and not line.startswith(word + " "):
                pass  # a library printing to stdout
            if not line:
                proc.wait()
                tail = self.logs[rank].read_text()[-3000:]
                raise SystemExit(f"{self.job['config']}/{self.job['path']}, {self.job['world']} rank(s): rank {rank} failed:\n{tail}")
            answers.append(json.loads(line[len(word) + 1 :]))
        return answers

    def ready(self) -> None:
        self.info = self._expect("ready")[0]

    def step(self) -> dict:
        """One step on every rank; the slowest rank's time, the mean embedding share."""
        self._say("go")
        ranks = self._expect("done")
        return {"step": max(r["step"] for r in ranks), "share": statistics.mean(r["embedding"] / r["step"] for r in ranks)}

    def finish(self) -> float:
        """Stops the ranks; their peak RSS in MB (``os.wait4``, the largest rank's)."""
        self._say("stop")
        peaks = []
        for rank, proc in enumerate(self.procs):
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = status  # reaped here; Popen must not wait on it again
            if status != 0:
                raise SystemExit(f"rank {rank} of {self.job} exited with {status}:\n{self.logs[rank].read_text()[-3000:]}")
            peaks.append(usage.ru_maxrss / 1024)
        return max(peaks)

    def kill(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                proc.kill()
                proc.wait()


def _others(pids: list[int], seconds: float, run=None) -> tuple[float, object]:
    """Share of the machine's CPU used by processes other than ``pids`` and this one while
    ``run()`` runs (or for ``seconds`` when it is None); -> (share, what ``run`` returned)."""
    busy0, ours0 = _cpu_ticks(pids)
    t0 = time.perf_counter()
    out = run() if run is not None else time.sleep(seconds)
    busy1, ours1 = _cpu_ticks(pids)
    capacity = (time.perf_counter() - t0) * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)
    return max(0, (busy1 - busy0) - (ours1 - ours0) - 1) / capacity, out  # - 1: a tick of rounding


def _run_pair(job: dict, tmp: Path, max_wait: float) -> dict[str, dict]:
    """Both paths of one configuration, built side by side and stepped in turns (baseline step,
    TorchRec step, ...), so that they share the machine's conditions. A measured step counts as
    quiet if the rest of the machine used at most ``QUIET_SHARE`` of its CPU meanwhile; after a
    disturbed step the next one waits (up to ``max_wait`` s in all) for the machine to be quiet.
    Steps go on until each path has ``steps`` quiet ones, or has run ``MAX_TRIES`` times that many;
    the median is over the quiet steps if there are at least half of ``steps`` (and 3), else over
    all (flagged noisy)."""
    groups = {path: _Group({**job, "path": path}, tmp) for path in PATHS}
    try:
        for g in groups.values():
            g.ready()
        for _ in range(job["warmup"]):
            for g in groups.values():
                g.step()
        pids = [p.pid for g in groups.values() for p in g.procs]
        quiet = {path: [] for path in PATHS}
        ran = {path: [] for path in PATHS}
        wait_until, disturbed = time.monotonic() + max_wait, False
        todo = lambda path: len(quiet[path]) < job["steps"] and len(ran[path]) < MAX_TRIES * job["steps"]  # noqa: E731
        while any(todo(path) for path in PATHS):
            for path, g in groups.items():
                if not todo(path):
                    continue
                while disturbed and time.monotonic() < wait_until and _others(pids, 0.5)[0] > QUIET_SHARE:
                    pass
                share, s = _others(pids, 0, g.step)
                ran[path].append(s)
                disturbed = share > QUIET_SHARE
                if not disturbed:
                    quiet[path].append(s)
        results = {}
        for path, g in groups.items():
            used = quiet[path] if len(quiet[path]) >= max(3, job["steps"] // 2) else ran[path]
            median = statistics.median(s["step"] for s in used)
            results[path] = {
                "examples_s": job["world"] * job["batch"] / median,
                "step_ms": 1000 * median,
                "embedding_share": statistics.median(s["share"] for s in used),
                "quiet": f"{len(quiet[path])}/{len(ran[path])}",
                "noisy": used is ran[path],  # too few quiet steps: the median is over all of them
                **g.info,
            }
        for path, g in groups.items():
            results[path]["peak_mb"] = g.finish()
        return results
    finally:
        for g in groups.values():
            g.kill()


def _plan_summary(plan: dict) -> str:
    by_type: dict[str, list[str]] = {}
    for table, kind in plan.items():
        by_type.setdefault(kind, []).append(table)
    # The small data-parallel tables only by count; the sharded ones by name.
    return "; ".join(f"{kind}: {len(t)} tables" if kind == "data_parallel" else f"{kind}: {', '.join(sorted(t))}" for kind, t in sorted(by_type.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="a generated `small` world to reuse (default: generate one into a temp dir, ~10 s)")
    p.add_argument("--configs", nargs="+", default=["default", "heavy"], choices=["default", "heavy"])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="world sizes to run")
    p.add_argument("--batch-size", type=int, default=2048, help="rows per rank per step")
    p.add_argument("--steps", type=int, default=10, help="quiet steps measured per path (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="steps run first and not measured")
    p.add_argument("--max-wait", type=float, default=90.0, help="seconds per configuration to wait for a quiet machine")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(json.loads(args.child))
        return
    if args.steps < 1 or args.warmup < 1 or args.batch_size < 1:
        raise SystemExit("--steps, --warmup and --batch-size must be >= 1 (one warm-up step at least: the first step pays for allocation)")

    with tempfile.TemporaryDirectory(prefix="derm-bench-train-") as tmp:
        data = args.data
        if data is None:
            data = str(Path(tmp) / "small")
            cmd = [sys.executable, "-m", "trainer.data.synthetic", "--preset", "small", "--out", data]
            subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True, capture_output=True)
        print(
            f"machine: {platform.machine()}, {os.cpu_count()} cores; python {platform.python_version()}; "
            f"ctr source of the small world; batch {args.batch_size} per rank; median of {args.steps} quiet steps after {args.warmup} warm-up"
        )
        header = (
            f"{'config':<9}{'path':<10}{'ranks':>6}{'threads/rank':>14}{'examples/s':>12}{'TR/base':>9}{'step ms':>9}"
            f"{'embedding %':>13}{'dense %':>9}{'peak MB/rank':>14}{'quiet steps':>13}"
        )
        print(header)
        print("-" * len(header))
        plans = []
        for config in args.configs:
            for world in args.ranks:
                job = {"config": config, "world": world, "data": data, "batch": args.batch_size, "batches": args.warmup + args.steps}
                results = _run_pair({**job, "steps": args.steps, "warmup": args.warmup}, Path(tmp), args.max_wait)
                base = results["baseline"]["examples_s"]
                for path, r in results.items():
                    ratio = f"{r['examples_s'] / base:.2f}" if path == "torchrec" else ""
                    print(
                        f"{config:<9}{path:<10}{world:>6}{r['threads']:>14}{r['examples_s']:>12,.0f}{ratio:>9}{r['step_ms']:>9,.0f}"
                        f"{100 * r['embedding_share']:>13.0f}{100 * (1 - r['embedding_share']):>9.0f}{r['peak_mb']:>14,.0f}"
                        f"{r['quiet'] + (' noisy' if r['noisy'] else ''):>13}",
                        flush=True,
                    )
                    if r["plan"]:
                        plans.append(f"  {config}, {world} rank(s): {_plan_summary(r['plan'])}")
        print("TorchRec plans (sharding type: tables):")
        print("\n".join(plans))


if __name__ == "__main__":
    main()
