"""Environments: multi-turn rollouts against an environment or tools, exact to the token.

An environment is a class named "module:Class" (`env.name`), built once per trajectory with **env.kwargs:

    class Env:
        def reset(self, record: dict) -> str | list[dict]: ...     # the first user turn: text, or chat messages
        def step(self, response: str) -> tuple[str | None, float | None, bool]: ...   # (observation, reward, done)
        def metrics(self) -> dict[str, float]: ...                 # optional: the trajectory's numbers so far

The loop (`EnvRunner.run`): the policy answers (up to rollout.max_new_tokens), `step` gets the decoded answer; its
observation becomes the next turn, and the policy answers again, until `done`, env.max_turns answers or
env.max_tokens tokens in the whole trajectory. A trajectory cut by a limit is flagged (`Rollout.truncated`) and
its step rewards sum to env.truncation_reward (null: the sum so far).

Token-exact: the trajectory is the prompt's ids, then each answer's sampled ids as they were sampled, then each
observation's ids, tokenized once through the chat template's turn format (`TurnFormat`); nothing is ever
re-tokenized, so the policy trains on exactly the ids it sampled. Only sampled tokens carry a loss, a KL, an
entropy and a rollout logprob (`Rollout.response_mask`); observations are context. A turn's reward sits on its
last sampled token (`Rollout.step_rewards`).

Environment calls run in worker processes (`workers.WorkerPool`) with env.timeout_s: the environment object
travels between the trainer and the workers pickled, so each call may run in any worker. An exception (or a
timeout) names the class, the prompt's index and the turn, and follows reward.function_errors: raise stops the
run; invalid ends that trajectory with reward.invalid_score as its last step reward (counted in env/errors).
An environment that draws random numbers should seed them from the record: a resumed or repeated iteration
then replays its trajectories exactly.
"""

from __future__ import annotations

import inspect
import json
import logging
import pickle
import re
import signal
import threading
from dataclasses import dataclass, field

import torch

from . import dist
from .config import EnvConfig, RewardConfig
from .data import DataError, PromptBatch, apply_chat_template, collate_prompts, encode_prompt
from .rollout import Rollout, sampling_seed
from .workers import WorkerPool, import_object

log = logging.getLogger("fastppo")


class EnvError(RuntimeError):
    """An environment is broken or failed; the message names its class (and the prompt and turn)."""


# ----------------------------------------------------------------------------
# The environment class, and its calls in the workers
# ----------------------------------------------------------------------------

def load_env_class(name: str) -> type:
    """The class behind env.name, checked at start-up: a class whose reset and step take one argument."""
    cls = import_object(name, "env.name", EnvError, what="class")
    if not inspect.isclass(cls):
        raise EnvError(f"env.name: {name} is a {type(cls).__name__}, not a class")
    for method, arg in (("reset", "record"), ("step", "response")):
        fn = getattr(cls, method, None)
        if not callable(fn):
            raise EnvError(f"env.name: {name} has no method {method}({arg}); an environment defines "
                           "reset(self, record) and step(self, response)")
        try:
            inspect.signature(fn).bind(None, None)
        except TypeError:
            raise EnvError(f"env.name: {name}.{method}{inspect.signature(fn)} must take one argument besides self "
                           f"({arg})") from None
    return cls


_CLASSES: dict[str, type] = {}


def env_call(name: str, kwargs: dict, state: bytes | None, method: str, arg) -> tuple:
    """One call in a worker: the environment (built with kwargs, or unpickled from `state`), `method`(arg) checked,
    and (result, the environment pickled again, its metrics() so far after a step)."""
    if name not in _CLASSES:
        _CLASSES[name] = load_env_class(name)
    env = _CLASSES[name](**kwargs) if state is None else pickle.loads(state)
    try:
        result = getattr(env, method)(arg)
    except SystemExit as exc:
        raise RuntimeError(f"it called sys.exit({exc.code!r}) (SystemExit)") from None
    if method == "reset":
        if not (isinstance(result, str) or (isinstance(result, list) and all(isinstance(m, dict) for m in result))):
            raise TypeError(f"reset returned {type(result).__name__} {result!r:.80}; it returns the first user "
                            "turn: a string, or a list of {role, content} messages")
    else:
        ok = (isinstance(result, tuple) and len(result) == 3 and (result[0] is None or isinstance(result[0], str))
              and (result[1] is None or isinstance(result[1], (int, float))) and isinstance(result[2], bool))
        if not ok:
            raise TypeError(f"step returned {result!r:.80}; it returns (observation: str | None, reward: float | None, "
                            "done: bool)")
    metrics = getattr(env, "metrics", None)
    metrics = metrics() if callable(metrics) else None
    if metrics is not None:
        if not (isinstance(metrics, dict) and all(isinstance(v, (int, float)) for v in metrics.values())):
            raise TypeError(f"metrics returned {metrics!r:.80}; it returns a dict of numbers")
    return result, pickle.dumps(env), (metrics if method == "step" else None)


# ----------------------------------------------------------------------------
# Turns as tokens
# ----------------------------------------------------------------------------

class TurnFormat:
    """How an observation becomes tokens after an answer: through the chat template's turn format (the template's
    end of the answer's turn, then the observation's turn and the generation prompt of the next answer), or
    as plain text. Each observation is tokenized once; what the policy sampled is never re-tokenized."""

    def __init__(self, tokenizer, role: str, chat: bool) -> None:
        self.tokenizer, self.role, self.chat = tokenizer, role, chat
        if chat:
            u, a = {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}
            head = apply_chat_template(tokenizer, [u], "the chat template", True)
            self._turn = apply_chat_template(tokenizer, [u, a], "the chat template", False)
            answer = tokenizer("a", add_special_tokens=False)["input_ids"]
            if self._turn[:len(head) + len(answer)] != head + answer:
                raise EnvError("env: the chat template does not render an assistant turn as its generation prompt "
                               "followed by the answer; use plain prompts (data.prompt_format=plain)")
            # What the template writes after an answer's text (its end-of-turn tokens), whatever the answer.
            self.closing = self._turn[len(head) + len(answer):]
            self._prefix = [u, a]

    def observation(self, text: str, ended: bool) -> list[int]:
        """The ids that follow an answer (which ended with EOS when `ended`) and precede the next answer."""
        tok = self.tokenizer
        if not self.chat:
            return tok(text, add_special_tokens=False)["input_ids"]
        full = apply_chat_template(tok, [*self._prefix, {"role": self.role, "content": text}], "the chat template",
                                   True)
        if full[:len(self._turn)] != self._turn:
            raise EnvError(f"env.observation_role={self.role}: the chat template renders an observation turn that does "
                           "not extend the conversation before it; choose the role the template expects (user or tool)")
        closing = self.closing[1:] if ended and self.closing[:1] == [tok.eos_token_id] else self.closing
        return closing + full[len(self._turn):]


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------

@dataclass
class EnvStats:
    """What the trajectories of an iteration's rounds add up to (summed over rows; `metrics` reduces them)."""
    rows: int = 0
    turns: int = 0
    turns_max: int = 0
    truncated: int = 0
    step_reward: float = 0.0
    observation_tokens: int = 0
    tokens: int = 0
    errors: int = 0
    extra: dict[str, float] = field(default_factory=dict)
    """Sums of the environments' own metrics()."""


@dataclass
class _Trajectory:
    index: int                                   # the prompt's index in the data
    state: bytes                                 # the environment, pickled
    ids: list[int]                               # everything after the first prompt
    sampled: list[bool]
    logprobs: list[float]
    entropy: list[float]
    step_rewards: list[float]
    turn_index: list[int]
    prompt: list[int]
    chat: bool = False                           # the first turn went through the chat template
    turns: int = 0
    done: bool = False
    truncated: bool = False
    ended: bool = False
    metrics: dict = field(default_factory=dict)  # the environment's metrics() after its last step


class EnvRunner:
    """The trajectories of phase 1 with an environment (env.name): `run` replaces the engine's single answer."""

    def __init__(self, ec: EnvConfig, rc: RewardConfig, tokenizer, records: list[dict], *, max_new_tokens: int,
                 max_prompt_len: int, prompt_format: str) -> None:
        load_env_class(ec.name)                                 # fails at start-up, before any model loads
        self.ec, self.rc, self.tok, self.records = ec, rc, tokenizer, records
        self.max_new_tokens, self.max_prompt_len, self.prompt_format = max_new_tokens, max_prompt_len, prompt_format
        self.pool = WorkerPool(ec.workers, preload=[__name__])
        self.formats: dict[bool, TurnFormat] = {}
        self.stats = EnvStats()

    def _calls(self, traj: list[_Trajectory], method: str, args: list, turn: int) -> list:
        """method(arg) of each trajectory's environment in the workers; each a result, or None when the call failed
        and reward.function_errors=invalid (the trajectory then ends)."""
        ec = self.ec
        futures = [self.pool.submit(env_call, (ec.name, dict(ec.kwargs), None if method == "reset" else t.state,
                                               method, a), ec.timeout_s) for t, a in zip(traj, args)]
        out = []
        for t, fut in zip(traj, futures):
            who = f"environment {ec.name}.{method} on prompt {t.index}, turn {turn}"
            called = WorkerPool.outcome(fut, who, EnvError)
            problem = (f"{who} timed out after {ec.timeout_s}s" if called.timed_out else
                       None if called.error is None else f"{who} raised: {called.error}")
            if problem is None:
                result, t.state, metrics = called.value
                t.metrics = metrics or t.metrics
                out.append(result)
                continue
            if method == "reset" or self.rc.function_errors != "invalid":
                raise EnvError(f"{problem} (set reward.function_errors=invalid to end such trajectories with "
                               "reward.invalid_score instead)" if method == "step" else problem)
            log.warning("%s: the trajectory ends with reward.invalid_score", problem)
            self.stats.errors += 1
            out.append(None)
        for fut in futures:
            fut.cancel()
        return out

    def _first_turn(self, value, t: _Trajectory) -> list[int]:
        where = f"environment {self.ec.name}.reset on prompt {t.index}"
        t.chat = isinstance(value, list) or self.prompt_format == "chat"
        if t.chat not in self.formats:
            self.formats[t.chat] = TurnFormat(self.tok, self.ec.observation_role, t.chat)
        try:
            ids = encode_prompt(self.tok, value, where=where, field="the first turn", prompt_format=self.prompt_format)
        except DataError as exc:
            raise EnvError(str(exc)) from None
        return ids[-self.max_prompt_len:]

    def run(self, engine, prompt_rows: list[int], *, seed: int, sample_ids: torch.Tensor) -> Rollout:
        """The trajectories of the prompts `prompt_rows` (indices into the records; this rank's rows), generated by
        `engine` turn by turn (the caller holds `engine.policy_loaded()`), as one Rollout whose prompt is each
        trajectory's first turn and whose response is everything after it. Sampling noise is fixed per (seed,
        turn, sample id): an iteration replays its trajectories exactly."""
        ec, tok = self.ec, self.tok
        traj = [_Trajectory(i, b"", [], [], [], [], [], [], []) for i in prompt_rows]
        for t, first in zip(traj, self._calls(traj, "reset", [self.records[i] for i in prompt_rows], 0)):
            t.prompt = self._first_turn(first, t)
        max_tokens = ec.max_tokens or 10 ** 12
        for turn in range(ec.max_turns):
            for t in traj:
                if not t.done and len(t.prompt) + len(t.ids) >= max_tokens:   # no room for another answer
                    t.done = t.truncated = True
            active = [k for k, t in enumerate(traj) if not t.done]
            if not active:
                break
            batch = collate_prompts([traj[k].prompt + traj[k].ids for k in active], tok.pad_token_id)
            turn_seed = seed if turn == 0 else sampling_seed(seed, turn)     # turn 0: the single-turn path's noise
            ro = engine.generate(PromptBatch(batch.input_ids, batch.attention_mask), seed=turn_seed,
                                 sample_ids=sample_ids[active])
            responses = []
            for j, k in enumerate(active):
                t = traj[k]
                n = int(ro.lengths[j])
                room = max_tokens - len(t.prompt) - len(t.ids)
                cut = min(n, room)
                t.ids += ro.responses[j, :cut].tolist()
                t.sampled += [True] * cut
                t.logprobs += ro.logprobs[j, :cut].tolist()
                t.entropy += ro.entropy[j, :cut].tolist() if ro.entropy is not None else [0.0] * cut
                t.step_rewards += [0.0] * cut
                t.turn_index += [turn] * cut
                t.turns += 1
                t.ended = bool(ro.ended[j]) and cut == n
                if cut < n:
                    t.truncated = True
                responses.append(tok.decode(ro.responses[j, :cut].tolist(), skip_special_tokens=True))
            steps = self._calls([traj[k] for k in active], "step", responses, turn)
            for k, result in zip(active, steps):
                t = traj[k]
                if result is None:                                   # a failed call, scored as invalid
                    t.step_rewards[-1] += self.rc.invalid_score
                    t.done = True
                    continue
                obs, reward, done = result
                t.step_rewards[-1] += 0.0 if reward is None else float(reward)
                if t.truncated or done:
                    t.done = True
                    continue
                if turn + 1 == ec.max_turns:
                    t.done = t.truncated = True
                    continue
                obs_ids = self.formats[t.chat].observation(obs or "", t.ended)
                if len(t.prompt) + len(t.ids) + len(obs_ids) >= max_tokens:
                    t.done = t.truncated = True
                    continue
                t.ids += obs_ids
                n_obs = len(obs_ids)
                t.sampled += [False] * n_obs
                t.logprobs += [0.0] * n_obs
                t.entropy += [0.0] * n_obs
                t.step_rewards += [0.0] * n_obs
                t.turn_index += [-1] * n_obs
        if ec.truncation_reward is not None:
            for t in traj:
                if t.truncated:
                    t.step_rewards[_last_sampled(t)] += ec.truncation_reward - sum(t.step_rewards)
        self._count(traj)
        return _as_rollout(traj, tok.pad_token_id, sample_ids.device)

    def metrics(self, device) -> dict[str, torch.Tensor]:
        """env/* of the trajectories since the last call (`env_metrics`)."""
        stats, self.stats = self.stats, EnvStats()
        return env_metrics(stats, device)

    def _count(self, traj: list[_Trajectory]) -> None:
        s = self.stats
        s.rows += len(traj)
        s.turns += sum(t.turns for t in traj)
        s.turns_max = max([s.turns_max, *(t.turns for t in traj)])
        s.truncated += sum(t.truncated for t in traj)
        s.step_reward += sum(sum(t.step_rewards) for t in traj)
        s.observation_tokens += sum(len(t.sampled) - sum(t.sampled) for t in traj)
        s.tokens += sum(len(t.ids) for t in traj)
        for t in traj:
            for k, v in t.metrics.items():
                s.extra[k] = s.extra.get(k, 0.0) + float(v)

    def close(self) -> None:
        self.pool.close()


def _last_sampled(t: _Trajectory) -> int:
    return max(i for i, s in enumerate(t.sampled) if s)


def _as_rollout(traj: list[_Trajectory], pad_id: int, device) -> Rollout:
    """The trajectories as a Rollout: first turns left-padded to a common width P, the rest right-padded."""
    prompts = collate_prompts([t.prompt for t in traj], pad_id)
    B, R = len(traj), max(1, max(len(t.ids) for t in traj))

    def rows(get, value, dtype):
        out = torch.full((B, R), value, dtype=dtype)
        for i, t in enumerate(traj):
            out[i, :len(t.ids)] = torch.tensor(get(t), dtype=dtype)
        return out.to(device)

    response = rows(lambda t: t.ids, pad_id, torch.long)
    return Rollout(
        sequences=torch.cat([prompts.input_ids.to(device), response], dim=1),
        attention_mask=torch.cat([prompts.attention_mask.to(device), rows(lambda t: [1] * len(t.ids), 0, torch.long)],
                                 dim=1),
        response_mask=rows(lambda t: t.sampled, False, torch.bool),
        lengths=torch.tensor([len(t.ids) for t in traj], device=device),
        ended=torch.tensor([t.ended for t in traj], device=device),
        prompt_width=prompts.input_ids.size(1),
        logprobs=rows(lambda t: t.logprobs, 0.0, torch.float32),
        entropy=rows(lambda t: t.entropy, 0.0, torch.float32),
        step_rewards=rows(lambda t: t.step_rewards, 0.0, torch.float32),
        turn_index=rows(lambda t: t.turn_index, -1, torch.long),
        turns=torch.tensor([t.turns for t in traj], device=device),
        truncated=torch.tensor([t.truncated for t in traj], device=device),
    )


def env_metrics(stats: EnvStats, device) -> dict[str, torch.Tensor]:
    """env/* of an iteration, over every trajectory generated (all ranks, all rounds): turns, truncation, step
    rewards, the observation tokens' share, errors, and the environments' own metrics() as env/<name>_mean (ToolEnv's
    tool_calls and tool_errors also as env/tool_calls_mean and env/tool_errors_frac)."""
    keys = sorted(set().union(*dist.all_gather_object(sorted(stats.extra))))   # a rank may lack some
    sums = dist.all_reduce(torch.tensor([stats.rows, stats.turns, stats.truncated, stats.step_reward,
                                         stats.observation_tokens, stats.tokens, stats.errors,
                                         *(stats.extra.get(k, 0.0) for k in keys)], dtype=torch.float64, device=device))
    rows = sums[0].clamp(min=1)
    out = {"env/turns_mean": sums[1] / rows,
           "env/turns_max": dist.all_reduce(torch.tensor(float(stats.turns_max), device=device), "max"),
           "env/truncated_frac": sums[2] / rows, "env/step_reward_mean": sums[3] / rows,
           "env/tokens_observation_frac": sums[4] / sums[5].clamp(min=1), "env/errors": sums[6]}
    extra = dict(zip(keys, sums[7:]))
    out.update({f"env/{k}_mean": v / rows for k, v in extra.items()})
    if "tool_calls" in extra:
        out["env/tool_errors_frac"] = extra.get("tool_errors", torch.zeros(())) / extra["tool_calls"].clamp(min=1)
    return out


# ----------------------------------------------------------------------------
# Tools
# ----------------------------------------------------------------------------

TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def parse_tool_calls(text: str) -> list[dict | str]:
    """The tool calls in an answer, each {"name", "arguments"} or, when it cannot be read, a string saying why.

    Two formats: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Qwen2.5, Hermes and the
    templates that have no format of their own), and an answer that is a single JSON object with "name" and
    "parameters" (Llama 3.1's JSON tool calling). "arguments" may be a JSON string (OpenAI's convention)."""
    blocks = TOOL_CALL.findall(text)
    if not blocks:
        stripped = text.strip()
        if not (stripped.startswith("{") and stripped.endswith("}")):
            return []
        try:
            obj = json.loads(stripped)
        except json.JSONDecodeError:
            return []                                  # an answer in braces, not a call
        if not (isinstance(obj, dict) and "name" in obj and ("parameters" in obj or "arguments" in obj)):
            return []
        blocks = [stripped]
    calls: list[dict | str] = []
    for block in blocks:
        try:
            obj = json.loads(block)
        except json.JSONDecodeError as exc:
            calls.append(f"the tool call is not JSON ({exc.msg} at character {exc.pos}): {block.strip()[:80]}")
            continue
        args = obj.get("arguments", obj.get("parameters", {})) if isinstance(obj, dict) else None
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                args = None
        if not (isinstance(obj, dict) and isinstance(obj.get("name"), str) and isinstance(args, dict)):
            calls.append('a tool call is {"name": "<tool>", "arguments": {...}}, got ' + block.strip()[:80])
            continue
        calls.append({"name": obj["name"], "arguments": args})
    return calls


class ToolTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise ToolTimeout


class ToolEnv:
    """Tool use: the policy answers with tool calls (`parse_tool_calls`), each is run and its result (or error) is the
    next turn's observation (env.observation_role, usually tool); an answer without a tool call is the final answer,
    scored by the reward functions (or reward model) on the final turn. env.kwargs:

        tools       ["module:function", ...]: plain Python functions, called with the call's arguments as keywords;
                    the result is sent back as text (JSON for dicts and lists)
        prompt_field  the record's field holding the first user turn (text, or a list of chat messages)
        system      a system message put before the first turn; "{tools}" in it is replaced by the tools' names,
                    signatures and first docstring lines, one JSON object per line
        timeout_s   seconds one tool call may run (past it the call is an error the model reads)

    metrics: tool_calls (calls made) and tool_errors (calls that could not be read, named no tool, raised or timed
    out), reported as env/tool_calls_mean and env/tool_errors_frac.
    """

    def __init__(self, tools: list[str], prompt_field: str = "prompt", system: str | None = None,
                 timeout_s: float = 5.0) -> None:
        if not isinstance(tools, (list, tuple)) or not tools:
            raise EnvError("env.kwargs.tools: ToolEnv needs a list of tools, \"module:function\" each")
        self.tools = {}                                # name -> "module:function": pickled by name, imported where run
        for name in tools:
            fn = import_object(name, "env.kwargs.tools", EnvError)
            self.tools[fn.__name__] = name
        self.prompt_field, self.system, self.timeout_s = prompt_field, system, float(timeout_s)
        self.calls = self.errors = 0

    def _function(self, name: str):
        return import_object(self.tools[name], "env.kwargs.tools", EnvError)

    def describe(self) -> str:
        """One JSON line per tool: its name, signature and the first line of its docstring."""
        lines = []
        for name in self.tools:
            fn = self._function(name)
            doc = (inspect.getdoc(fn) or "").split("\n")[0]
            try:
                signature = inspect.signature(fn, eval_str=True)      # "int", not "'int'", under postponed annotations
            except Exception:
                signature = inspect.signature(fn)
            lines.append(json.dumps({"name": name, "signature": f"{name}{signature}",
                                     "description": doc}))
        return "\n".join(lines)

    def reset(self, record: dict):
        if self.prompt_field not in record:
            raise KeyError(f"the record has no field {self.prompt_field!r} (env.kwargs.prompt_field); it has "
                           f"{sorted(record)}")
        first = record[self.prompt_field]
        if self.system is None:
            return first
        messages = first if isinstance(first, list) else [{"role": "user", "content": first}]
        return [{"role": "system", "content": self.system.replace("{tools}", self.describe())}, *messages]

    def step(self, response: str):
        calls = parse_tool_calls(response)
        if not calls:
            return None, None, True                    # the final answer
        return "\n".join(self._run(call) for call in calls), None, False

    def _run(self, call: dict | str) -> str:
        self.calls += 1
        if isinstance(call, str):
            self.errors += 1
            return f"error: {call}"
        if call["name"] not in self.tools:
            self.errors += 1
            return f"error: no tool named {call['name']!r}; the tools are {sorted(self.tools)}"
        main = threading.current_thread() is threading.main_thread()
        if main:                                       # a worker process runs calls in its main thread
            previous = signal.signal(signal.SIGALRM, _alarm)
            signal.setitimer(signal.ITIMER_REAL, self.timeout_s)
        try:
            result = self._function(call["name"])(**call["arguments"])
        except ToolTimeout:
            self.errors += 1
            return f"error: {call['name']} timed out after {self.timeout_s:g}s"
        except Exception as exc:
            self.errors += 1
            return f"error: {type(exc).__name__}: {exc}"
        finally:
            if main:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
        return json.dumps(result) if isinstance(result, (dict, list)) else str(result)

    def metrics(self) -> dict[str, float]:
        return {"tool_calls": self.calls, "tool_errors": self.errors}
