"""`fastppo demo`: the whole RLHF pipeline on a laptop CPU, offline, in minutes.

    0 data        synthetic task (fastppo.synthetic): SFT responses, preference pairs, prompts;
                  a word-level HF tokenizer and a tiny Llama built from config (random init)
    1 sft         `fastppo sft`       (sft.sft)               -> sft/export
    2 reward      `fastppo train-rm`  (reward_training.train_rm) -> rm/export
    3 ppo_max     `fastppo train --preset ppo_max`  (train.train) -> ppo_max/export/policy
      vanilla     `fastppo train --preset vanilla`  with --compare vanilla
    4 evaluate    held-out prompts (animal/colour pairs never seen in training):
                  RM accuracy; reward, hidden rule score, KL to SFT, length, perplexity
                  before (SFT) and after PPO; samples
    5 report      summary table, plots/*.png, summary.json, samples.jsonl

Every stage is configured exactly as its command would be (the same config
loaders and entry points, with dotted overrides), so the demo is also an
example of the stage commands. The overrides change sizes, learning rates and
iteration counts for tiny models (the paper's 5e-7 is for 7B models); each
preset keeps its algorithmic knobs (KL penalty, reward scaling / normalisation
/ clipping, value clipping, advantage whitening, GAE lambda, grad clipping,
critic warm-up). Deterministic given --seed (on one machine and thread count).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from ..config import RMConfig, RolloutConfig, SFTConfig, load_config
from .. import plots
from ..data import collate_prompts, load_prompts
from ..health import check_run
from ..models import ensure_pad_token, load_tokenizer, response_logprobs, score_at
from ..reward_training import train_rm
from ..rollout import generate, with_eos_for_scoring
from ..run_dir import claim
from ..sft import sft
from ..train import train
from . import common
from . import synthetic as S
from .common import DEMO_MARKER, Stages, TinyPlan, read_last_eval, read_metrics, replace_earlier_demo, run_overrides

log = logging.getLogger("fastppo")


@dataclass
class DemoPlan(TinyPlan):
    """Sizes and schedules of the demo (not the algorithm: each preset keeps its knobs)."""
    n_sft: int = 4000
    """SFT examples (train prompts only)."""
    n_pairs: int = 4000
    """Preference pairs for the reward model (train prompts only)."""
    n_eval_pairs: int = 400
    """Held-out preference pairs (held-out prompts) for RM accuracy."""
    n_prompts: int = 2048
    """PPO training prompts."""
    n_eval_prompts: int = 256
    """Held-out prompts for the before/after evaluation."""
    rm_epochs: float = 2.0
    rm_lr: float = 1e-3
    ppo_iterations: int = 150
    policy_lr: float = 1e-4
    """Tiny-model learning rates; the paper's critic/policy ratio (1.65e-6 / 5e-7 = 3.3) is kept."""
    critic_lr: float = 3.3e-4
    rollout_batch_size: int = 128
    """The presets' 128 rollouts / minibatches of 32 / 1 epoch (4 optimizer steps per iteration)."""
    minibatch_size: int = 32
    micro_batch_size: int = 32
    """One micro-batch per minibatch: tiny models need no gradient accumulation."""
    max_new_tokens: int = 24
    """Room for about twice the longest SFT response, so that length can saturate visibly."""


def quick_plan() -> DemoPlan:
    """A shortened demo (the tests use it): fewer examples and iterations, same code path."""
    return DemoPlan(n_sft=1500, n_pairs=1500, n_eval_pairs=200, n_prompts=512, n_eval_prompts=128,
                    sft_epochs=2.0, rm_epochs=1.5, ppo_iterations=30, rollout_batch_size=64, minibatch_size=16,
                    micro_batch_size=16)


# ----------------------------------------------------------------------------
# 0. Data, tokenizer, initial model
# ----------------------------------------------------------------------------

def make_task(out: Path, plan: DemoPlan, seed: int, write: bool = True) -> dict[str, Path]:
    """Write the synthetic data sets, the tokenizer and a randomly initialised tiny Llama; their paths (write=False:
    the paths alone)."""
    data, init = out / "data", out / "init"
    paths = {name: data / f"{name}.jsonl" for name in ("sft", "pairs", "pairs_eval", "prompts", "prompts_eval")}
    paths["init"] = init
    if not write:
        return paths
    S.write_jsonl(paths["sft"], S.make_sft_data(plan.n_sft, seed * 10 + 1))
    S.write_jsonl(paths["pairs"], S.make_preference_data(plan.n_pairs, seed * 10 + 2))
    S.write_jsonl(paths["pairs_eval"], S.make_preference_data(plan.n_eval_pairs, seed * 10 + 3, split="eval", noisy=False))
    S.write_jsonl(paths["prompts"], S.make_prompts(plan.n_prompts, seed * 10 + 4))
    S.write_jsonl(paths["prompts_eval"], S.make_prompts(plan.n_eval_prompts, seed * 10 + 5, split="eval"))
    tokenizer = S.build_tokenizer(init)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(S.tiny_llama_config(len(tokenizer), hidden_size=plan.hidden_size, layers=plan.layers,
                                                 heads=plan.heads))
    model.save_pretrained(init, safe_serialization=True)
    return paths


# ----------------------------------------------------------------------------
# 1-3. The stages, configured as their commands would be
# ----------------------------------------------------------------------------

def sft_overrides(paths: dict, out: Path, plan: DemoPlan, seed: int, progress_bar: bool) -> list[str]:
    return common.sft_overrides(paths["init"], paths["sft"], out / "sft", plan, seed, progress_bar)


def rm_overrides(paths: dict, out: Path, plan: DemoPlan, seed: int, progress_bar: bool) -> list[str]:
    return [f"model.path={out / 'sft' / 'export'}", f"data.train_path={paths['pairs']}",
            f"data.eval_path={paths['pairs_eval']}", f"optim.lr={plan.rm_lr}", "optim.warmup_steps=10",
            f"run.epochs={plan.rm_epochs}", "run.batch_size=32", "run.micro_batch_size=32", "run.eval_every=25",
            *run_overrides(out / "rm", seed, progress_bar)]


def ppo_overrides(preset: str, paths: dict, out: Path, plan: DemoPlan, seed: int, progress_bar: bool,
                  iterations: int | None = None, resume: bool = False) -> list[str]:
    ov = [f"model.policy_path={out / 'sft' / 'export'}", f"model.reward_path={out / 'rm' / 'export'}",
          f"data.prompt_path={paths['prompts']}",
          f"optim.policy_lr={plan.policy_lr}", f"optim.critic_lr={plan.critic_lr}",
          f"run.iterations={iterations or plan.ppo_iterations}", "run.save_every=0", "run.keep_last=1",
          f"rollout.rollout_batch_size={plan.rollout_batch_size}", f"ppo.minibatch_size={plan.minibatch_size}",
          f"ppo.micro_batch_size={plan.micro_batch_size}", f"rollout.max_new_tokens={plan.max_new_tokens}",
          f"rollout.engine={plan.rollout_engine}",
          *run_overrides(out / preset, seed, progress_bar), *(["run.resume=latest"] if resume else [])]
    if preset == "ppo_max":  # PPO-max's ptx loss on the SFT data (the other presets have ptx off)
        ov.append(f"data.ptx_path={paths['sft']}")
    return ov


# ----------------------------------------------------------------------------
# 4. Evaluation on held-out prompts
# ----------------------------------------------------------------------------

@dataclass
class PolicyEval:
    reward: float
    """Mean reward-model score (at EOS, appended when missing)."""
    rule: float
    """Mean hidden rule score (the simulated human; not seen by PPO)."""
    kl: float
    """Mean sequence KL to the SFT model, sum over response tokens of log pi - log pi_sft (at temperature T)."""
    length: float
    """Mean response length in tokens (EOS counted)."""
    perplexity: float
    """exp of the mean negative token logprob of the responses under the policy itself (at T)."""
    repeat: float
    """Fraction of responses that repeat a content word (the collapse pattern)."""
    samples: list[dict]


@torch.no_grad()
def evaluate_policy(policy_dir: Path, sft_dir: Path, rm_dir: Path, prompts_path: Path, *, seed: int, temperature: float,
                    top_p: float, max_new_tokens: int, batch_size: int = 64) -> PolicyEval:
    """Sample one response per held-out prompt (fixed seed) and measure it."""
    tok = load_tokenizer(str(sft_dir))
    ensure_pad_token(tok)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    sft_model = AutoModelForCausalLM.from_pretrained(sft_dir).eval()
    reward = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1).eval()
    prompts = load_prompts(prompts_path, tok, field="prompt", prompt_format="plain", max_len=64)
    texts = [json.loads(line)["prompt"] for line in open(prompts_path)]
    rc = RolloutConfig(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    torch.manual_seed(seed)
    rows: dict[str, list] = {k: [] for k in ("reward", "rule", "kl", "length", "logprob", "repeat")}
    samples = []
    for start in range(0, len(prompts), batch_size):
        batch = collate_prompts(prompts[start:start + batch_size], tok.pad_token_id)
        ro = generate(policy, batch, rc, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, generation_batch_size=batch_size)
        kw = dict(prompt_width=ro.prompt_width, temperature=temperature, fused=True)
        lp = response_logprobs(policy, ro.sequences, ro.attention_mask, ro.response_mask, **kw).logprobs
        lp_sft = response_logprobs(sft_model, ro.sequences, ro.attention_mask, ro.response_mask, **kw).logprobs
        ids, mask, eos_index = with_eos_for_scoring(ro, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
        rows["reward"].append(score_at(reward, ids, mask, eos_index))
        rows["kl"].append(((lp - lp_sft) * ro.response_mask).sum(-1))
        rows["length"].append(ro.lengths.float())
        rows["logprob"].append((lp * ro.response_mask).sum(-1))
        for i, resp in enumerate(ro.responses):
            text = tok.decode(resp[ro.response_mask[i]], skip_special_tokens=True)
            prompt = texts[start + i]
            score = S.rule_score(S.parse_prompt(prompt), text)
            content = [w for w in text.split() if w in S.PLEASANT or w in S.PLAIN]
            rows["rule"].append(torch.tensor([score]))
            rows["repeat"].append(torch.tensor([float(len(content) != len(set(content)))]))
            if len(samples) < 8:
                samples.append({"prompt": prompt, "response": text, "rule_score": score,
                                "reward": float(rows["reward"][-1][i])})
    cat = {k: torch.cat(v).double() for k, v in rows.items()}
    n_tokens = cat["length"].sum()
    return PolicyEval(
        reward=float(cat["reward"].mean()), rule=float(cat["rule"].mean()), kl=float(cat["kl"].mean()),
        length=float(cat["length"].mean()), perplexity=math.exp(-float(cat["logprob"].sum() / n_tokens)),
        repeat=float(cat["repeat"].mean()), samples=samples,
    )


# ----------------------------------------------------------------------------
# 5. Report: plots, table
# ----------------------------------------------------------------------------

# (metric key in metrics.jsonl, plot title, PNG name)
CURVES = [
    ("score/raw/mean", "reward (RM score)", "reward"),
    ("kl/ref_per_sequence", "KL to SFT (per sequence)", "kl"),
    ("response/length_mean", "response length", "length"),
    ("policy/perplexity", "perplexity", "perplexity"),
    ("policy/entropy", "entropy", "entropy"),
]
COLORS = {"ppo_max": "tab:blue", "vanilla": "tab:red", "moss_release": "tab:green"}


def plot_runs(runs: dict[str, list[dict]], evals: dict[str, PolicyEval], out: Path) -> list[Path]:
    """The dashboard of `fastppo plot` (`fastppo.plots`) of the presets overlaid, with the hidden rule score on the
    held-out prompts as a last panel (overview.png), and one PNG per curve of CURVES, drawn by the same panels."""
    plt = plots.pyplot()
    out.mkdir(parents=True, exist_ok=True)
    colors = {name: COLORS.get(name, "tab:grey") for name in runs}

    def rule_bars(ax) -> None:
        names = list(evals)
        ax.bar(range(len(names)), [evals[n].rule for n in names], color=[COLORS.get(n, "tab:grey") for n in names])
        ax.set_xticks(range(len(names)), names)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.grid(alpha=0.3, axis="y")

    overview = plots.dashboard(runs, out / "overview.png", extra=("hidden rule score, held-out prompts (the 'human')",
                                                                  rule_bars),
                               title="fastppo demo: PPO on a tiny Llama (reward model learned from preferences)",
                               colors=colors)
    written = [overview]
    for key, title, name in CURVES:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        plots.draw_panel(ax, runs, plots.Panel(title, (key,)), colors)
        if key == "policy/perplexity":
            ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def summary_table(rm_metrics: dict, evals: dict[str, PolicyEval]) -> str:
    cols = [("reward", "reward ↑"), ("rule", "rule score"), ("kl", "KL to SFT"), ("length", "length"),
            ("perplexity", "perplexity"), ("repeat", "repeats")]
    head = f"{'held-out prompts':<18}" + "".join(f"{c[1]:>12}" for c in cols)
    lines = [f"reward model: held-out accuracy {rm_metrics.get('eval/accuracy', float('nan')):.3f}, "
             f"mean margin {rm_metrics.get('eval/margin', float('nan')):.2f}", "", head, "-" * len(head)]
    for name, e in evals.items():
        label = "SFT (before PPO)" if name == "sft" else f"{name} (after)"
        cells = []
        for key, _ in cols:
            v = getattr(e, key)
            cells.append(f"{v:>12.1%}" if key == "repeat" else f"{v:>12.3f}")
        lines.append(f"{label:<18}" + "".join(cells))
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------

@dataclass
class DemoResult:
    output_dir: Path
    rm_metrics: dict
    evals: dict[str, PolicyEval]
    stage_seconds: dict[str, float]
    plots: list[Path]
    exports: dict[str, Path]
    health: dict[str, list[str]]
    """The health monitor's messages on each PPO run (none: healthy)."""


def _quiet_transformers() -> None:
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def run_demo(output_dir: str | Path = "runs/demo", *, seed: int = 0, compare: list[str] | None = None,
             plan: DemoPlan | None = None, progress_bar: bool = True, echo=print, resume: bool = False) -> DemoResult:
    """SFT -> reward model -> PPO-max (and the compared presets) -> held-out evaluation -> report.

    The folder is locked while the demo runs: a second demo there stops instead of replacing this one's files.
    SIGTERM or Ctrl-C stop it with DemoStopped; resume=True continues a stopped demo in `output_dir` (its
    stages done are kept, an interrupted `train` resumes from its checkpoint; `synthetic.Stages`).
    """
    out = Path(output_dir)
    if not resume:
        replace_earlier_demo(out, echo)
    with claim(out, field="--output-dir"):
        return _run_demo(out, seed=seed, compare=compare, plan=plan, progress_bar=progress_bar, echo=echo,
                         resume=resume)


def _run_demo(out: Path, *, seed: int, compare: list[str] | None, plan: DemoPlan | None, progress_bar: bool,
              echo, resume: bool) -> DemoResult:
    _quiet_transformers()
    plan = plan or DemoPlan()
    presets = ["ppo_max", *[p for p in (compare or []) if p != "ppo_max"]]
    echo(f"[demo] seed {seed}; outputs in {out.resolve()}")
    with Stages(out, resume=resume, echo=echo) as stages:
        (out / DEMO_MARKER).write_text(json.dumps({"task": "preferences", "seed": seed, "presets": presets,
                                                   **asdict(plan)}, indent=2))
        paths = make_task(out, plan, seed, write=False)
        stages.run("data", lambda _: make_task(out, plan, seed), done=out / "init" / "config.json")
        stages.run("sft", lambda _: sft(load_config(schema=SFTConfig,
                                                    overrides=sft_overrides(paths, out, plan, seed, progress_bar))),
                   done=out / "sft" / "export" / "config.json", run_dir=out / "sft")
        stages.run("reward", lambda _: train_rm(load_config(schema=RMConfig, overrides=rm_overrides(
            paths, out, plan, seed, progress_bar))), done=out / "rm" / "export" / "config.json", run_dir=out / "rm")
        rm_metrics = read_last_eval(out / "rm")

        runs: dict[str, list[dict]] = {}
        cfgs = {}
        for preset in presets:
            cfgs[preset] = load_config(None, ppo_overrides(preset, paths, out, plan, seed, progress_bar), preset=preset)
            stages.run(preset, lambda resumable: train(load_config(None, ppo_overrides(
                preset, paths, out, plan, seed, progress_bar, resume=resumable), preset=preset)),
                done=out / preset / "export" / "policy" / "config.json", run_dir=out / preset)
            runs[preset] = read_metrics(out / preset)

        rc = cfgs["ppo_max"].rollout
        eval_kw = dict(seed=seed, temperature=rc.temperature, top_p=rc.top_p, max_new_tokens=rc.max_new_tokens)
        sft_dir, rm_dir = out / "sft" / "export", out / "rm" / "export"

        def evaluate(_) -> dict[str, PolicyEval]:
            evals = {"sft": evaluate_policy(sft_dir, sft_dir, rm_dir, paths["prompts_eval"], **eval_kw)}
            for preset in presets:
                evals[preset] = evaluate_policy(out / preset / "export" / "policy", sft_dir, rm_dir,
                                                paths["prompts_eval"], **eval_kw)
            return evals

        evals = stages.run("evaluate", evaluate)
    seconds = stages.seconds
    t_all = stages.t_all

    pngs = plot_runs(runs, evals, out / "plots")
    table = summary_table(rm_metrics, evals)
    # The health monitor's verdict on each PPO run (`health.check_run`: its checks replayed on the run's metrics,
    # the same ones it printed while the run trained; also right after a --resume that kept the runs).
    health = {preset: [a.message for a in check_run(out / preset)] for preset in presets}
    with open(out / "samples.jsonl", "w") as f:
        for name, e in evals.items():
            for s in e.samples:
                f.write(json.dumps({"policy": name, **s}) + "\n")
    exports = {"sft": sft_dir, "reward_model": rm_dir, **{p: out / p / "export" / "policy" for p in presets}}
    summary = {
        "seed": seed, "reward_model": rm_metrics, "stage_seconds": seconds,
        "held_out": {n: {k: v for k, v in asdict(e).items() if k != "samples"} for n, e in evals.items()},
        "exports": {k: str(v) for k, v in exports.items()}, "health": health,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    echo("")
    echo(table)
    echo("")
    for preset, messages in health.items():
        echo(f"health monitor, {preset}: " + ("; ".join(messages) if messages else "no warning"))
    echo("")
    for name in evals:
        echo(f"samples, {name}:")
        for s in evals[name].samples[:3]:
            echo(f"  {s['prompt']} {s['response']}   [reward {s['reward']:+.2f}, rule {s['rule_score']:+.0f}]")
    echo("")
    echo(f"[demo] total {time.perf_counter() - t_all:.1f}s. Everything is in {out.resolve()}:")
    echo("  plots/overview.png (+ one PNG per curve), summary.json, samples.jsonl,")
    echo(f"  <stage>/metrics.jsonl and <stage>/tensorboard (tensorboard --logdir {out}),")
    echo("  models: " + ", ".join(f"{k} -> {v.relative_to(out)}" for k, v in exports.items()))
    return DemoResult(out, rm_metrics, evals, seconds, pngs, exports, health)


