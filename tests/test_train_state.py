"""The train state (`train.TrainState`): one object saved and loaded field by field; setup helpers in `fastppo.logs`."""

import ast
import dataclasses
import io
from pathlib import Path

import torch

import fastppo
from fastppo.data import EpochSampler
from fastppo.shaping import AdaptiveKLController
from fastppo.metrics import RunningMoments
from fastppo.optim import UpdateCounters
from fastppo.train import TrainState


def _state(ptx: bool = True, cls=TrainState, **extra) -> TrainState:
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    scheds = [torch.optim.lr_scheduler.LinearLR(torch.optim.SGD([p], lr=1.0), start_factor=0.5, total_iters=10)
              for p in params]
    return cls(policy_sched=scheds[0], critic_sched=scheds[1], reward_moments=RunningMoments(),
                      kl_controller=AdaptiveKLController(0.1, 6.0, 100), counters=UpdateCounters(),
                      sampler=EpochSampler(7, seed=0), ptx_sampler=EpochSampler(5, seed=1) if ptx else None, **extra)


def _advance(s: TrainState) -> None:
    for sched in (s.policy_sched, s.critic_sched):
        sched.optimizer.step()
        sched.step()
    s.policy_sched.optimizer.step()
    s.policy_sched.step()                                   # the two schedules differ
    s.reward_moments.merge(torch.tensor(4.0), torch.tensor(1.5), torch.tensor(0.25))
    s.kl_controller.update(9.0, 8)
    s.counters.optimizer_steps, s.counters.skipped_steps, s.counters.nonfinite_in_a_row = 5, 2, 1
    s.sampler.next(10)                                      # into the second epoch
    if s.ptx_sampler is not None:
        s.ptx_sampler.next(3)


def _saved(s: TrainState) -> dict:
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)                         # as trainer_state.pt stores it
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_state_dict_names_every_field_as_the_checkpoint_does():
    s = _state()
    assert set(s.state_dict()) == {f.name for f in dataclasses.fields(TrainState)} == {
        "policy_sched", "critic_sched", "reward_moments", "kl_controller", "counters", "sampler", "ptx_sampler"}
    assert _state(ptx=False).state_dict()["ptx_sampler"] is None


def test_load_restores_every_field_and_the_next_draws():
    a = _state()
    _advance(a)
    b = _state()
    counters = b.counters
    b.load_state_dict(_saved(a))
    assert b.state_dict() == a.state_dict()
    assert b.counters is counters                           # in place: the loop's reference sees the resumed counts
    assert b.policy_sched.get_last_lr() == a.policy_sched.get_last_lr() != b.critic_sched.get_last_lr()
    assert b.sampler.next(4) == a.sampler.next(4)
    assert b.ptx_sampler.next(4) == a.ptx_sampler.next(4)


def test_ptx_sampler_absent_from_the_checkpoint_keeps_its_fresh_state():
    a = _state(ptx=False)
    _advance(a)
    b = _state()
    b.load_state_dict(_saved(a))
    assert b.ptx_sampler.state_dict() == {"epoch": 0, "position": 0, "n": 5}
    assert b.sampler.state_dict() == a.sampler.state_dict()


def test_a_new_field_is_saved_and_resumed_without_another_line():
    @dataclasses.dataclass
    class Extended(TrainState):
        eval_sampler: EpochSampler = None

    a = _state(cls=Extended, eval_sampler=EpochSampler(9, seed=2))
    a.eval_sampler.next(4)
    b = _state(cls=Extended, eval_sampler=EpochSampler(9, seed=2))
    b.load_state_dict(_saved(a))
    assert b.eval_sampler.state_dict() == {"epoch": 0, "position": 4, "n": 9}


def test_no_module_imports_train_lazily():
    """seed_everything / setup_logging live in fastppo.logs, so no stage needs a function-level import of train."""
    lazy = []
    for path in Path(fastppo.__file__).parent.rglob("*.py"):
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lazy += [f"{path.name}:{n.lineno}" for n in ast.walk(fn)
                         if isinstance(n, ast.ImportFrom) and n.module == "train" and n.level == 1]
    assert lazy == []
