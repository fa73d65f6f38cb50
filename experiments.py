"""
The paper's comparative findings, reproduced at toy scale on the built-in synthetic data and scored
exactly with the oracle benchmark, oracle.py (held-out colour-shape pairs never seen in training):

  1. conditioning: cross-attention vs adaLN-zero          (Table 2 rows 1-2, Fig. 4)
  2. pooled text added to the time embedding, or not       (Sec. 3.2.1, last paragraph)
  3. model scale: toy vs S, same data, steps and batch     (Fig. 5, Table 2 last row)
  4. motion-free guidance: T2V trained with p_motion_free = 0.5 and joint image-video batches,
     sampled with lambda_M in {1.0, 1.1, 1.2, 1.3}, vs one trained without the motion-free mask
                                                           (Sec. 3.3.2, Eq. 6, Fig. 8)
  Not in the paper, only when named: QK-norm (--t2i-arms cross-attn "cross-attn, QK-norm").

Every arm of a comparison gets the same budget (steps, batch, lr, seed, data order). Arms train
concurrently as separate `train_t2i.py` / `train_t2v.py` processes, spread over the visible GPUs.
The scale pair has its own budget (the S model costs about 11x the toy's FLOPs per sample, 13x its parameters).
The T2I phase ends with the baseline arm's EMA weights exported; the T2V phase starts from them.
Every score comes with its 95% Wilson score interval (results.json: KEY_ci; results.md: in parentheses).

--budget toy (the default) is minutes on 4 GPUs; --budget paper is the bundled models' recipe
(docs/bundled-models.md) at 30.7M images per T2I arm, hours. --time-limit MIN splits a long comparison into
runs of about MIN minutes: each run stops its arms at the limit with a checkpoint, scores the finished ones,
lists the others as unfinished and exits with status 75; the same command again continues them (--resume).

    python experiments.py --out runs/exp                    # both phases, writes results.md/.json
    python experiments.py --out runs/exp --phase t2i        # T2I arms only (then --phase t2v later)
    python experiments.py --out runs/exp --seeds 0 1        # two seeds per T2I arm
    python experiments.py --out runs/paper --budget paper --time-limit 22   # again until every arm finished
    python experiments.py --smoke --device cpu              # minutes-long end-to-end check of the pipeline
"""

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time

import torch

from checkpoint import checkpoint_step, checkpoints, export, is_run_dir, write_json
from oracle import oracle_eval
from pipeline import load_model

PAPER_ARMS = {  # name -> extra train_t2i.py flags (the first arm is the baseline and the T2V parent)
    "cross-attn": [],
    "adaLN-zero": ["--conditioning", "adaln"],
    "cross-attn, no pooled": ["--no-pooled-text"],
}
# every arm --t2i-arms accepts: the paper's, and ours that run only when named (not in the paper)
T2I_ARMS = {**PAPER_ARMS, "cross-attn, QK-norm": ["--qk-norm"]}  # docs/bundled-models.md, "Why QK-norm"
SCALE_ARMS = {"size toy": ["--size", "toy"], "size S": ["--size", "S"]}  # cross-attn, at the scale budget
T2V_ARMS = {"MFG (p_mf=0.5)": ["--p-motion-free", "0.5"], "no motion-free (p_mf=0)": ["--p-motion-free", "0"]}
# Eq. 6 at lambda_M = 1 is plain CFG; above 1 it needs e(0, 0) with the identity temporal mask, which a p_mf = 0
# model never trained on: that arm is scored at lambda_M = 1 alone (the paper's comparison, Sec. 3.3.2, Fig. 8)
CFG_ONLY_ARMS = {"no motion-free (p_mf=0)"}

# Every flag below whose default is None takes its value from --budget; a flag given on the command line wins.
# t2v_ema, t2v_n_eval, t2v_seeds None: the same as --ema, --n-eval and the first of --seeds.
BUDGETS = {
    # minutes on 4 GPUs: 3.1M images per T2I arm, every arm near the floor on the binding categories
    "toy": dict(steps=3000, batch_size=1024, lr=1e-3, scale_steps=1500, scale_batch_size=512, scale_lr=5e-4,
                t2v_steps=2500, t2v_batch_size=64, t2v_lr=5e-4, lr_schedule="cosine", ema=0.999, t2v_ema=None,
                qk_norm=False, n_eval=100, t2v_n_eval=None, t2v_seeds=None),
    # the bundled models' recipes (docs/bundled-models.md): T2I batch 2048, lr 1e-3 cosine, EMA 0.9995, QK-norm,
    # 15,000 steps = 30.7M images (the bundled run: 74% colour binding at 29.3M); the scale pair on the same images
    # at its own lr, 5e-4 (S is less stable at 1e-3); T2V 2000 steps of 128 clips, lr 5e-4 cosine, EMA 0.998, two
    # seeds.
    # 300 prompts per category / 500 clips: intervals of +-5.6 / +-4.4 points at 50% (+-9.6 at 100)
    "paper": dict(steps=15000, batch_size=2048, lr=1e-3, scale_steps=15000, scale_batch_size=2048, scale_lr=5e-4,
                  t2v_steps=2000, t2v_batch_size=128, t2v_lr=5e-4, lr_schedule="cosine", ema=0.9995, t2v_ema=0.998,
                  qk_norm=True, n_eval=300, t2v_n_eval=500, t2v_seeds=[0, 1]),
}
CKPT_EVERY = 1000  # steps between an arm's checkpoints (and its last step): what a killed call loses at most
MIN_PIECE = 1.0  # minutes: with less of --time-limit left, an arm waits for the next call (set-up would eat it)
EXIT_UNFINISHED = 75  # EX_TEMPFAIL (sysexits.h): arms are unfinished, the same command again continues them


class Parser(argparse.ArgumentParser):
    def parse_args(self, args=None, namespace=None):
        return fill(super().parse_args(args, namespace))  # what the command line left unset: from --budget


p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--out", default="runs/exp")
p.add_argument("--phase", default="all", choices=["t2i", "t2v", "all"])
p.add_argument("--budget", default="toy", choices=list(BUDGETS),
               help="defaults of the flags below: toy (minutes) or paper (the bundled models' recipes, hours)")
p.add_argument("--time-limit", type=float, default=None, metavar="MIN",
               help="minutes of training per call: arms stop at it with a checkpoint and are listed as unfinished "
                    "(not scored); the same command again continues them")
p.add_argument("--steps", type=int, help="T2I steps per arm (toy 3000, paper 15000)")
p.add_argument("--batch-size", type=int, help="T2I (toy 1024, paper 2048)")
p.add_argument("--lr", type=float, help="T2I arms (1e-3 cosine; the paper's constant 1e-4 is for 500K steps)")
p.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=None,
               help="QK-norm in every arm (toy: off, paper: on, as the bundled model)")
p.add_argument("--scale-steps", type=int,
               help="steps of each arm of the scale pair (0: skip it; toy 1500, paper 15000)")
p.add_argument("--scale-batch-size", type=int, help="toy 512, paper 2048")
p.add_argument("--scale-lr", type=float, help="the scale pair's lr (5e-4: S is less stable at 1e-3)")
p.add_argument("--t2v-steps", type=int, help="toy 2500, paper 2000")
p.add_argument("--t2v-batch-size", type=int, help="toy 64, paper 128")
p.add_argument("--t2v-lr", type=float, help="5e-4")
p.add_argument("--t2v-ema", type=float, help="EMA decay of the T2V arms (toy: --ema, paper 0.998)")
p.add_argument("--t2v-seeds", type=int, nargs="+", help="seeds of the T2V arms (toy: the first of --seeds, paper 0 1)")
p.add_argument("--parent", default=None, help="T2V phase: T2I run folder, ckpt or export (default: the baseline arm)")
p.add_argument("--lr-schedule", choices=["constant", "cosine"], help="of every arm (train_t2i.py; cosine)")
p.add_argument("--ema", type=float, help="EMA decay (toy 0.999: a toy run is shorter than DiT's 1/(1-0.9999); "
                                         "paper 0.9995)")
p.add_argument("--seeds", type=int, nargs="+", default=[0])
p.add_argument("--n-eval", type=int, help="held-out prompts per category (T2I; toy 100, paper 300)")
p.add_argument("--t2v-n-eval", type=int, help="held-out clips (T2V; toy: --n-eval, paper 500)")
p.add_argument("--cfg", type=float, nargs="+", default=[4.0, 7.5], help="lambda_T values for T2I scoring")
p.add_argument("--t2v-cfg", type=float, default=7.5, help="lambda_T for T2V, fixed as in Sec. 3.3.2")
p.add_argument("--mfg", type=float, nargs="+", default=[1.0, 1.1, 1.2, 1.3])
p.add_argument("--num-samples", type=int, default=16, help="held-out prompts in each arm's samples.png")
p.add_argument("--workers", type=int, default=3, help="DataLoader workers per training process")
p.add_argument("--compile", action="store_true", help="torch.compile the blocks of every arm")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
p.add_argument("--export-assets", action="store_true", help="write the baseline T2I / MFG T2V EMA weights to assets/")
p.add_argument("--t2i-arms", nargs="+", default=list(PAPER_ARMS), choices=list(T2I_ARMS),
               help="T2I arms to run (the first is the T2V parent); default: the paper's comparisons")
p.add_argument("--smoke", action="store_true", help="tiny budget, to check the pipeline end to end")


def fill(args):
    """The --budget's value of every flag left unset; idempotent."""
    for key, value in BUDGETS[args.budget].items():
        if getattr(args, key) is None:
            setattr(args, key, list(value) if isinstance(value, list) else value)
    args.t2v_ema = args.ema if args.t2v_ema is None else args.t2v_ema
    args.t2v_n_eval = args.n_eval if args.t2v_n_eval is None else args.t2v_n_eval
    args.t2v_seeds = args.t2v_seeds or args.seeds[:1]
    return args


def launch(script, out, flags, args, log, minutes=None, resume=False):
    """Start one training run as its own process (its own CUDA context); returns the Popen. minutes: its
    --time-limit; resume: continue from its newest checkpoint (an arm stopped by an earlier call's limit)."""
    device = "cuda:0" if args.device == "cuda" else args.device  # each process sees one GPU
    cmd = [sys.executable, script, "--out", out, "--device", device, "--num-workers", str(args.workers),
           "--log-every", "250", "--eval-n", "0", "--num-samples", str(args.num_samples), "--keep", "2",
           *(["--compile"] if args.compile else []), *(["--time-limit", f"{minutes:.4g}"] if minutes else []),
           *(["--resume"] if resume else []), *flags]  # oracle scores: below, for every arm alike
    print(" ".join(cmd[1:]), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}  # several processes share the host's cores
    if torch.cuda.device_count() > 1:  # spread the arms over the GPUs, one process per GPU in turn
        env["CUDA_VISIBLE_DEVICES"] = str(launch.count % torch.cuda.device_count())
    launch.count += 1
    # appended: the log of an arm trained in several calls holds every piece
    proc = subprocess.Popen(cmd, stdout=open(log, "a"), stderr=subprocess.STDOUT, env=env)
    if torch.device(args.device).type == "cpu":
        proc.wait()  # on CPU the arms would only compete for the same cores: run them one at a time
    return proc


launch.count = 0


def record_path(out):
    """The flags an arm was started with (written at its first launch): its later pieces must use the same."""
    return os.path.join(out, "experiment.json")


def step_of(out):
    found = checkpoints(out)
    return checkpoint_step(found[-1]) if found else 0


def finished(out, steps):
    """Whether the arm in `out` has finished its `steps` steps (then it is scored, not retrained). Fewer steps
    with the record of its flags: an arm stopped by --time-limit (or killed), continued with --resume. More steps,
    or fewer without that record (a run of another call, a --smoke run in the same --out, say), is an error: it
    would be scored, or continued, as this one."""
    found = checkpoints(out)
    if not found:
        return False
    step = checkpoint_step(found[-1])
    if step < steps and os.path.exists(record_path(out)):
        return False
    if step != steps:
        raise SystemExit(f"{out} holds a run of {step} steps but this call trains {steps}"
                         + (" and has no record of its flags to continue it with" if step < steps else "")
                         + ": use another --out (or remove that folder)")
    return True


def plan(out, script, flags, steps):
    """'done', 'resume' or 'start'. An arm is continued or scored only under the flags it was started with:
    another --lr or --batch-size would make it another run, scored as this one."""
    done = finished(out, steps)
    if checkpoints(out) and os.path.exists(record_path(out)):
        was = json.load(open(record_path(out)))["flags"]
        if was != flags:
            raise SystemExit(f"{out} was started with {' '.join(was)}, this call gives it {' '.join(flags)}: "
                             "call with the flags of the call that started it, or use another --out")
    return "done" if done else "resume" if checkpoints(out) else "start"


def minutes_left(args, t0):
    return None if args.time_limit is None else args.time_limit - (time.time() - t0) / 60


def train(script, arms, args, t0):
    """Train every arm of {key: (out, steps, flags)} that has not finished (continuing those stopped by an earlier
    call's --time-limit), concurrently on GPUs; -> {key: step} of the arms still unfinished."""
    plans = {key: plan(out, script, flags, steps) for key, (out, steps, flags) in arms.items()}  # all refusals first
    jobs = {}
    for key, (out, steps, flags) in arms.items():
        left = minutes_left(args, t0)  # on the CPU, after the arms before this one ran one at a time
        if plans[key] == "done" or (left is not None and left < min(MIN_PIECE, args.time_limit / 2)):
            continue  # finished, or no time for a piece in this call: the next call starts it
        if plans[key] == "start":
            os.makedirs(out, exist_ok=True)
            write_json(record_path(out), {"script": script, "steps": steps, "flags": flags})
        jobs[key] = (launch(script, out, flags, args, out + ".log", left, plans[key] == "resume"), out + ".log")
    run_all(jobs)  # a run stopped by its --time-limit exits with status 0 and its checkpoint
    return {key: step_of(out) for key, (out, steps, _) in arms.items() if not finished(out, steps)}


def run_all(jobs):
    """Wait for every job; a failed run stops the experiment with its log's tail."""
    for name, (proc, log) in jobs.items():
        if proc.wait() != 0:
            tail = open(log).read()[-3000:]
            raise SystemExit(f"arm {name!r} failed (log {log}):\n{tail}")


def wilson(k, n, z=1.96):
    """Wilson score interval of k successes in n trials (95% at z = 1.96): unlike p +- z sqrt(p(1-p)/n) it stays
    inside [0, 1] and is not empty at 0 or n successes, where toy arms' scores often are."""
    if n == 0:
        return 0.0, 1.0
    p, zz = k / n, z * z / n
    centre, half = (p + zz / 2) / (1 + zz), z * math.sqrt(p * (1 - p) / n + zz / (4 * n)) / (1 + zz)
    return max(0.0, centre - half), min(1.0, centre + half)


def intervals(s):
    """KEY_ci = [lo, hi] for every fraction of an oracle_eval result, from its counts ("n")."""
    n = s.get("n")
    if isinstance(n, int):  # T2V: n clips. Frame attributes and consistency are means of per-clip fractions,
        # whose frames are not independent: counted by clip, the interval is the wider (conservative) one
        counts = {k: n for k in ("frame_attribute", "direction", "consistency")}
    elif isinstance(n, dict):  # T2I: n prompts per category
        pairs = sum(n.get(c, 0) for c in ("color", "shape", "spatial"))
        counts = {**n, "overall": pairs,  # overall: the mean of three categories of equal n, one pooled fraction
                  "colors_placed": pairs,  # over the two-object prompts
                  "object_recall": n.get("single", 0) + 2 * pairs}  # one object per single prompt, two otherwise
    else:
        return s  # no counts (an older or partial result)
    for key, total in counts.items():
        if s.get(key) is not None and total:
            s[key + "_ci"] = [round(v, 4) for v in wilson(s[key] * total, total)]
    return s


def earlier(rows, out, **settings):
    """A row an earlier call scored from this arm's newest checkpoint with these settings: reused, so that the later
    calls of a long comparison score only what changed."""
    found = checkpoints(out)
    for r in rows if found else []:
        s = r.get("settings") or {}
        if s.get("ckpt") == os.path.abspath(found[-1]) and all(s.get(k) == v for k, v in settings.items()):
            return r
    return None


def unfinished(results, phase, arms, left):
    """results["unfinished"]: this phase's entries replaced by the arms not finished in this call."""
    rows = [u for u in results.get("unfinished", []) if u["phase"] != phase]
    for key, step in left.items():
        out, steps, _ = arms[key]
        names = ("group", "arm", "seed") if phase == "t2i" else ("arm", "seed")
        rows.append({"phase": phase, **dict(zip(names, key)), "step": step, "steps": steps, "out": out})
    results["unfinished"] = rows


def phase_t2i(args, results, t0):
    """The T2I arms (all seeds) and the scale pair, concurrently; then every finished arm on the same held-out
    prompts and noise seeds. The baseline arm's EMA weights, once it has finished, are exported: the T2V parent."""
    # --patch 2 for every arm: the toy row would otherwise switch to 4x4 patches on a CPU (train_t2i.py)
    recipe = ["--lr-schedule", args.lr_schedule, "--ema", str(args.ema), "--patch", "2",
              *(["--qk-norm"] if args.qk_norm else [])]
    budget = ["--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
              "--ckpt-every", str(min(args.steps, CKPT_EVERY)), "--lr", str(args.lr), *recipe]
    scale = ["--max-steps", str(args.scale_steps), "--batch-size", str(args.scale_batch_size),
             "--ckpt-every", str(min(args.scale_steps, CKPT_EVERY)), "--lr", str(args.scale_lr),
             "--seed", str(args.seeds[0]), *recipe]
    arms = [(("conditioning", name, seed), args.steps, [*budget, "--seed", str(seed), *T2I_ARMS[name]])
            for seed in args.seeds for name in args.t2i_arms]
    if args.scale_steps:  # the scale pair last, S first: the slowest arm gets a GPU of its own
        arms += [(("scale", name, args.seeds[0]), args.scale_steps, [*scale, *flags])
                 for name, flags in SCALE_ARMS.items()][::-1]
    arms = {key: (os.path.join(args.out, f"t2i-{slug(key[1])}-s{key[2]}"), steps, flags) for key, steps, flags in arms}
    left = train("train_t2i.py", arms, args, t0)
    print(f"T2I arms: {len(arms) - len(left)} of {len(arms)} finished, {time.time() - t0:.0f}s", flush=True)
    # rows of arms not run here (e.g. seed 0 when this call adds --seeds 1) are kept
    old = results.get("t2i", [])
    results["t2i"] = [r for r in old if (r["group"], r["arm"], r["seed"]) not in arms]
    for key, (out, _, _) in arms.items():
        if key in left:
            continue  # unfinished: not scored (its rows, if any, were of another run)
        group, name, seed = key
        model = None
        for cfg in args.cfg:
            mine = [r for r in old if (r["group"], r["arm"], r["seed"]) == key]
            row = earlier(mine, out, n_per_category=args.n_eval, cfg=cfg, mfg=None)
            if row is None:
                if model is None:
                    model, meta = load_model(out, ema=True, device=args.device)
                s = oracle_eval(model, meta, n_per_category=args.n_eval, seed=1000, cfg=cfg, device=args.device,
                                progress=False)
                row = {"group": group, "arm": name, "seed": seed, "cfg": cfg, **intervals(s)}
            results["t2i"].append(row)
    unfinished(results, "t2i", arms, left)
    write(results, args, t0)
    key = ("conditioning", args.t2i_arms[0], args.seeds[0])
    if key in left:
        return  # no parent from an unfinished arm: the T2V phase waits for it
    if not os.path.exists(parent_path(args)):  # the first call's baseline: T2V arms trained later start from it too
        export(arms[key][0], parent_path(args))  # fp32 EMA weights: the T2V phase starts from them
    if args.export_assets:  # the bundled models (docs/bundled-models.md): EMA weights in fp16, < 20 MB together
        export(arms[key][0], "assets/gentron_t2i.safetensors", dtype="fp16")


def check_parent(parent):
    """A T2V arm never starts from an unfinished T2I arm of this script (a --parent given by hand, say)."""
    run = parent if is_run_dir(parent) else os.path.dirname(parent) if checkpoint_step(parent) is not None else None
    if run and os.path.exists(record_path(run)):
        steps = json.load(open(record_path(run)))["steps"]
        step = step_of(run) if run == parent else checkpoint_step(parent)
        if step < steps:
            raise SystemExit(f"T2V phase: the T2I parent {parent} is at step {step} of {steps}: finish its T2I arm "
                             "first (the same T2I call again), or pass a finished run as --parent")


def t2v_folder(args, name, seed):
    # seed 0: t2v-NAME, the folder of a one-seed T2V phase (docs/experiments.md's commands); others t2v-NAME-sSEED
    return os.path.join(args.out, f"t2v-{slug(name)}" + (f"-s{seed}" if seed else ""))


def phase_t2v(args, results, t0, parent):
    """The T2V arms, each at every --t2v-seeds, from the same finished T2I parent (Sec. 3.3.1); then every finished
    arm scored at each lambda_M (Eq. 6)."""
    check_parent(parent)
    flags = ["--init-from", parent, "--max-steps", str(args.t2v_steps), "--batch-size", str(args.t2v_batch_size),
             "--ckpt-every", str(min(args.t2v_steps, CKPT_EVERY)), "--lr", str(args.t2v_lr),
             "--lr-schedule", args.lr_schedule, "--ema", str(args.t2v_ema)]
    arms = {(name, seed): (t2v_folder(args, name, seed), args.t2v_steps, [*flags, "--seed", str(seed), *arm])
            for seed in args.t2v_seeds for name, arm in T2V_ARMS.items()}
    left = train("train_t2v.py", arms, args, t0)
    print(f"T2V arms: {len(arms) - len(left)} of {len(arms)} finished, {time.time() - t0:.0f}s", flush=True)
    old = results.get("t2v", [])
    results["t2v"] = [r for r in old if (r["arm"], r.get("seed", 0)) not in arms]
    for key, (out, _, _) in arms.items():
        if key in left:
            continue
        name, seed = key
        model = None
        for mfg in [1.0] if name in CFG_ONLY_ARMS else args.mfg:
            mine = [r for r in old if (r["arm"], r.get("seed", 0)) == key]
            row = earlier(mine, out, n_per_category=args.t2v_n_eval, cfg=args.t2v_cfg, mfg=mfg)
            if row is None:
                if model is None:
                    model, meta = load_model(out, ema=True, device=args.device)
                s = oracle_eval(model, meta, n_per_category=args.t2v_n_eval, seed=1000, cfg=args.t2v_cfg, mfg=mfg,
                                device=args.device, progress=False)
                row = {"arm": name, "seed": seed, "mfg": mfg, **intervals(s)}
            results["t2v"].append(row)
    unfinished(results, "t2v", arms, left)
    write(results, args, t0)
    first = (next(iter(T2V_ARMS)), args.t2v_seeds[0])
    if args.export_assets and first not in left:
        export(arms[first][0], "assets/gentron_t2v.safetensors", dtype="fp16")


def parent_path(args):
    return os.path.join(args.out, "t2i-parent.safetensors")


def main(args, argv=None):
    """argv: the command line, printed as the command that continues unfinished arms."""
    if args.smoke:
        args.steps, args.scale_steps, args.t2v_steps, args.n_eval, args.t2v_n_eval = 20, 10, 10, 4, 4
        args.batch_size, args.scale_batch_size, args.t2v_batch_size = 8, 8, 4
        args.cfg, args.mfg, args.num_samples, args.t2v_seeds = args.cfg[:1], args.mfg[:2], 2, args.t2v_seeds[:1]
    os.makedirs(args.out, exist_ok=True)
    file = os.path.join(args.out, "results.json")
    results = json.load(open(file)) if os.path.exists(file) else {}  # a later phase adds to an earlier one
    # every call's flags, in order: a later call (a second seed, say) adds rows and must not erase how the
    # earlier rows were made
    results.setdefault("settings", {}).setdefault(args.phase, vars(args))  # the first call of each phase
    results.setdefault("calls", []).append({**vars(args), "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    t0 = time.time()
    if args.phase in ("t2i", "all"):
        phase_t2i(args, results, t0)
    if args.phase == "all" and any(u["phase"] == "t2i" for u in results.get("unfinished", [])):
        print("T2V phase: starts once every T2I arm has finished", flush=True)
    elif args.phase in ("t2v", "all"):
        parent = args.parent or parent_path(args)
        if not os.path.exists(parent):
            raise SystemExit(f"T2V phase: no T2I parent at {parent}; run --phase t2i first or pass --parent")
        phase_t2v(args, results, t0, parent)
    phases = ("t2i", "t2v") if args.phase == "all" else (args.phase,)
    waiting = [u for u in results.get("unfinished", []) if u["phase"] in phases]
    if waiting:
        again = "python experiments.py " + shlex.join(argv) if argv is not None else "the same experiments.py call"
        print(f"{len(waiting)} arm(s) unfinished, not scored:\n"
              + "".join(f"  {u['phase']} {u['arm']!r} seed {u['seed']}: step {u['step']} of {u['steps']}\n"
                        for u in waiting)
              + f"continue them with the same command:\n  {again}", flush=True)
        sys.exit(EXIT_UNFINISHED)
    print(f"every arm finished: {os.path.join(args.out, 'results.md')}", flush=True)


def write(results, args, t0):
    """results.json and results.md (the tables of docs/experiments.md) in --out; printed too."""
    results.setdefault("seconds", {})[args.phase] = time.time() - t0
    results["calls"][-1]["seconds"] = time.time() - t0
    results.setdefault("device", {})[args.phase] = (torch.cuda.get_device_name() if torch.device(args.device).type
                                                    == "cuda" else "cpu")
    file = os.path.join(args.out, "results.json")
    write_json(file, results, default=str)  # atomic: an interrupted write never loses the earlier phase
    table = tables(results)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table)
    print(table, flush=True)


def slug(name):
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def tables(results):
    """Markdown tables in the layout of Table 2 (T2I) and of the MFG ablation (T2V), in percent with the 95%
    Wilson interval in parentheses; then the arms not finished yet."""
    def pct(r, key):
        v, ci = r.get(key), r.get(key + "_ci")
        return "-" if v is None else f"{100 * v:.1f}" + (f" ({100 * ci[0]:.1f}-{100 * ci[1]:.1f})" if ci else "")

    lines = ["Percent; in parentheses the 95% Wilson score interval.", "",
             "| arm | seed | CFG | Color | Shape | Spatial | Overall | Single obj. | Obj. recall |",
             "|---|---|---|---|---|---|---|---|---|"]
    rows = sorted(results.get("t2i", []), key=lambda r: r.get("group") == "scale")  # conditioning first
    for i, r in enumerate(rows):
        if i and r.get("group") != rows[i - 1].get("group"):
            lines.append("| *model scale (own budget)* | | | | | | | | |")
        lines.append(f"| {r['arm']} | {r['seed']} | {r['cfg']} | "
                     + " | ".join(pct(r, k) for k in ("color", "shape", "spatial", "overall", "single",
                                                      "object_recall"))
                     + " |")
    lines += ["", "| T2V arm | seed | lambda_M | Frame attr. | Direction | Consistency |", "|---|---|---|---|---|---|"]
    for r in results.get("t2v", []):
        lines.append(f"| {r['arm']} | {r.get('seed', 0)} | {r['mfg']} | "
                     + " | ".join(pct(r, k) for k in ("frame_attribute", "direction", "consistency")) + " |")
    if results.get("unfinished"):
        lines += ["", "Unfinished arms (not scored; the same command again continues them):", "",
                  "| phase | arm | seed | step | of |", "|---|---|---|---|---|"]
        lines += [f"| {u['phase']} | {u['arm']} | {u['seed']} | {u['step']} | {u['steps']} |"
                  for u in results["unfinished"]]
    return "\n".join(lines) + "\n"


def check_args(args):
    """Settings that would fail (or score nothing) only after hours of training: refused before the first arm."""
    counts = ("steps", "batch_size", "scale_batch_size", "t2v_steps", "t2v_batch_size", "n_eval", "t2v_n_eval")
    for name in counts + ("scale_steps", "num_samples", "workers"):
        lo = 1 if name in counts else 0
        if getattr(args, name) < lo:
            p.error(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(args, name)}")
    for name in ("seeds", "t2v_seeds"):
        if min(getattr(args, name)) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {min(getattr(args, name))}")
    for name in ("lr", "scale_lr", "t2v_lr"):
        if not getattr(args, name) > 0:  # (also nan)
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ("ema", "t2v_ema"):
        if not 0 <= getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}")
    if args.time_limit is not None and not 0 < args.time_limit < math.inf:
        p.error(f"--time-limit must be > 0 minutes, got {args.time_limit}")
    if args.qk_norm and "cross-attn, QK-norm" in args.t2i_arms:  # it would be the cross-attn arm again
        p.error('--t2i-arms "cross-attn, QK-norm" compares against arms without QK-norm: leave out --qk-norm '
                "(or that arm)")
    from pipeline import check_settings

    try:  # as sample.py: finite guidance scales, a device this machine has
        for cfg in args.cfg:
            check_settings(dict(seed=0, cfg=cfg, mfg=1.0, device=args.device), out_dir=args.out)
        for mfg in args.mfg:
            check_settings(dict(seed=0, cfg=args.t2v_cfg, mfg=mfg, device=args.device), args.out, {"cfg": "--t2v-cfg"})
    except ValueError as e:
        p.error(str(e))


if __name__ == "__main__":
    args = p.parse_args()
    check_args(args)
    main(args, sys.argv[1:])
