"""The site's trusted trainer: runs a task's model and loss under the SITE's DP-SGD.

The task brings a model factory, a per-example loss and metrics; everything that makes the
privacy guarantee is the site's and comes from :class:`TrainSettings` (the site's noise
multiplier, clip, sample rate and step count; the coordinator's learning rate and optimiser).
One call of :func:`train_task` is one round of local work, with the same sampling, noise and
seeds as :func:`cleanroom.site_agent.training.train_local` (Poisson batches, exactly
``local_steps`` steps, empty batches allowed, noise from a generator seeded by the site).

Under DP the trainer does not trust task code to keep examples apart:

* per-example gradients are computed by the trainer with ``torch.func``: ``vmap`` over
  ``grad`` of the task's loss on ONE example at a time (model and loss see a batch of one), so
  neither the model's forward nor the loss can couple examples (the structural property
  DP-SGD's per-example clipping needs). The trainer clips them itself, once (Opacus's
  formula, as its ``clip_and_accumulate`` would: each example's whole gradient scaled to
  L2 norm at most the clip, summed), and hands a copy of the clipped sum to Opacus's
  :class:`DPOptimizer`, which adds the noise and scales (its ``add_noise`` and
  ``scale_grad``, as in ``pre_step``). A batch is processed in chunks of at most
  :data:`PER_EXAMPLE_BYTES` of per-example gradients (the clipped sum accumulates across
  chunks, as with Opacus's ``BatchMemoryManager``), so memory does not grow with batch size
  x model size;
* before training, the loss is checked on a probe batch of the site's rows: it must return
  per-example values of shape ``(n,)`` and be DECOMPOSABLE (each example's loss computed alone,
  and with one other example dropped, equals its value in the batch). A loss coupling the
  batch (a Cox partial likelihood over the batch's risk sets) is refused (``task-loss``);
* the model must pass Opacus's :class:`ModuleValidator` (no BatchNorm, ...; ``task-model``
  names the module);
* after every step the trainer re-checks what task code could reach: the optimiser's noise
  multiplier, clip, expected batch size, generator and hyper-parameters; that the noise
  generator advanced by exactly one step's draws; that the noisy gradient equals the
  site's clipped sum plus the noise regenerated with ``torch._C`` primitives by the guard's
  own generator, which follows the site's draw for draw from its seed (a generator
  re-seeded or advanced by task code gives other noise: refused); that no parameter or buffer
  changed while task code ran; and that the parameters after the optimiser's step equal an
  independent recomputation of the step from the parameters at the START of the step (plain
  SGD in the parameter's dtype within 4 roundings; momentum and Adam from float64 state), so
  a parameter moved anywhere in the step is refused too. Any difference is refused
  (``task-tampered``); functions a task replaced (``torch.normal``, Opacus's noise and
  clipping) are put back.

Limits: task code runs in this process; these checks make the listed attacks fail loudly but
do not sandbox arbitrary Python. What keeps unreviewed code out is approval of the task digest
(a site runs only digests it approved). Evaluation metrics are released without DP.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import opacus.optimizers.optimizer as _opacus_optimizer
import torch
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn

from cleanroom.errors import TaskError
from cleanroom.models import get_parameters, set_parameters
from cleanroom.site_agent.datasets import TaskData
from cleanroom.site_agent.training import TrainResult, TrainSettings, _make_optimizer, _seeds
from cleanroom.task import LoadedTask, Task, architecture_digest, build_task_model

log = logging.getLogger(__name__)

__all__ = ["PROBE_ROWS", "TaskData", "TrainResult", "TrainSettings", "check_loss",
           "evaluate_task", "prepare_model", "train_task"]

PROBE_ROWS = 32
"""Rows of the site's training split the loss is probed on (fewer if the split is smaller)."""
PER_EXAMPLE_BYTES = 64 * 2**20
"""Per-example gradients held at once under DP (a batch is processed in chunks of rows)."""
CHECK_ELEMENTS = 1 << 20
"""Parameter elements the float64 update re-computation handles at once."""
PROBE_RTOL, PROBE_ATOL = 1e-5, 1e-6
CHECK_RTOL = 1e-4
FLOAT32_ULP = 4 * 1.2e-7  # a few float32 roundings of a parameter's value
"""Relative tolerance of the per-step gradient and update re-computations (float32 rounding)."""
SGD_ROUNDINGS = 4
"""Plain SGD's step recomputed in the parameter's dtype may differ by this many roundings."""
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults (what we construct)

_NORMAL = torch._C._VariableFunctions.normal  # the C primitive, not the patchable torch.normal
_TRAIN_LOCK = threading.Lock()

# torch wraps an optimiser class's ``step`` (profiling hook) when its first instance is made:
# make one of each now, so the functions captured below are the ones training will call.
for _cls in (torch.optim.SGD, torch.optim.Adam):
    _cls([torch.zeros(1, requires_grad=True)], lr=0.1)

# Functions task code could replace to weaken DP; captured when the trainer is imported.
_GUARDED: tuple[tuple[object, str], ...] = (
    (torch, "normal"), (torch, "randn"), (torch, "randn_like"), (torch, "einsum"),
    (_opacus_optimizer, "_generate_noise"), (_opacus_optimizer, "_check_processed_flag"),
    (_opacus_optimizer, "_mark_as_processed"),
    (DPOptimizer, "pre_step"), (DPOptimizer, "add_noise"), (DPOptimizer, "clip_and_accumulate"),
    (DPOptimizer, "scale_grad"), (DPOptimizer, "_get_flat_grad_sample"),
    (DPOptimizer, "zero_grad"), (DPOptimizer, "grad_samples"), (DPOptimizer, "params"),
    (torch.optim.SGD, "step"), (torch.optim.Adam, "step"),
    (torch.optim.Optimizer, "zero_grad"),
)
_ORIGINALS: dict[tuple[int, str], object] = {
    (id(owner), name): owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    for owner, name in _GUARDED}


def _tampered_functions() -> list[str]:
    """Guarded functions that are no longer the originals; puts the originals back."""
    changed = []
    for owner, name in _GUARDED:
        original = _ORIGINALS[(id(owner), name)]
        current = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name,
                                                                                    None)
        if current is not original:
            changed.append(f"{owner.__name__}.{name}")  # type: ignore[attr-defined]
            setattr(owner, name, original)
    return changed


# --------------------------------------------------------------------------- checks


def _task_call(task: Task, what: str, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    try:
        return fn()
    except TaskError:
        raise
    except Exception as exc:
        raise TaskError("task-error", f"task {task.name}: {what} raised "
                        f"{type(exc).__name__}: {exc}") from exc


def prepare_model(loaded: LoadedTask, params: Mapping[str, np.ndarray], *, dp: bool) -> nn.Module:
    """A fresh model from the task, checked and loaded with ``params`` (strict).

    Refuses (``task-model``) a factory whose model differs from the loaded task's architecture
    digest, holds non-float32 parameters or, under DP, a module Opacus's ModuleValidator
    rejects (the error names the module). Bad ``params`` are ``parameters-invalid``.
    """
    task = loaded.task
    model = build_task_model(task)
    digest = architecture_digest(model)
    if digest != loaded.architecture_digest:
        raise TaskError("task-model", f"task {task.name}: model() built architecture "
                        f"{digest[:16]}, the loaded task's is {loaded.architecture_digest[:16]} "
                        "(the factory must build the same model every time)")
    bad = [n for n, p in model.named_parameters() if p.dtype != torch.float32]
    if bad:
        raise TaskError("task-model", f"task {task.name}: parameter {bad[0]!r} is not float32")
    if dp:
        model.train()
        problems = []
        for path, sub in model.named_modules():
            validator = ModuleValidator.VALIDATORS.get(type(sub))
            if validator is None:
                continue
            for error in validator(sub):
                first = str(error).split(". ")[0]
                problems.append(f"module {path or '<root>'} ({type(sub).__name__}): {first}")
        if problems:
            raise TaskError("task-model", f"task {task.name} cannot train with DP: "
                            + "; ".join(problems))
    try:
        set_parameters(model, params)
    except ValueError as exc:
        raise TaskError("parameters-invalid", f"task {task.name}: {exc}") from None
    return model


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=PROBE_RTOL, atol=PROBE_ATOL))


def check_loss(task: Task, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
               decomposable: bool = True) -> None:
    """Refuse a loss that is not per-example (``task-loss``).

    On a probe batch (the first :data:`PROBE_ROWS` rows given): ``loss(outputs, targets)`` must
    be a finite float tensor of shape ``(n,)``; with ``decomposable``, every example's loss
    computed alone, and every example's loss with one other example dropped, must equal its
    value in the whole batch.
    """
    xp, yp = x[:PROBE_ROWS], y[:PROBE_ROWS]
    n = int(xp.shape[0])
    with torch.no_grad():
        out = _task_call(task, "model forward", lambda: model(xp)).detach()
        full = _task_call(task, "loss", lambda: task.loss(out, yp))
        if not isinstance(full, torch.Tensor):
            raise TaskError("task-loss", f"task {task.name}: loss returned a "
                            f"{type(full).__name__}, expected a tensor of shape ({n},)")
        if tuple(full.shape) != (n,):
            raise TaskError("task-loss", f"task {task.name}: loss must return per-example "
                            f"values of shape ({n},), got {tuple(full.shape)} (do not reduce "
                            "with mean or sum)")
        if not full.is_floating_point() or not bool(torch.isfinite(full).all()):
            raise TaskError("task-loss", f"task {task.name}: loss values must be finite floats")
        if not decomposable or n < 2:
            return
        if _decomposable_batched(task, out, yp, full):
            return
        for i in range(n):
            alone = task.loss(out[i:i + 1], yp[i:i + 1])
            if not isinstance(alone, torch.Tensor) or not _close(alone.reshape(-1), full[i:i + 1]):
                raise TaskError("task-loss", f"task {task.name}: the loss is not decomposable: "
                                f"example {i}'s loss alone differs from its value in the batch "
                                "(a loss over the batch, e.g. a Cox partial likelihood, is "
                                "refused under DP: per-example clipping does not bound its "
                                "sensitivity)")
        keep = torch.ones(n, dtype=torch.bool)
        for i in range(n):
            keep[i] = False
            rest = task.loss(out[keep], yp[keep])
            if not isinstance(rest, torch.Tensor) or not _close(rest, full[keep]):
                raise TaskError("task-loss", f"task {task.name}: the loss is not decomposable: "
                                f"dropping example {i} changes the other examples' losses "
                                "(refused under DP)")
            keep[i] = True


def _decomposable_batched(task: Task, out: torch.Tensor, y: torch.Tensor,
                          full: torch.Tensor) -> bool:
    """The decomposability probe in two vmapped calls of the loss (every example alone; every
    example's batch with one other example dropped); False if they disagree or the loss
    cannot be vmapped, and the caller then probes one call at a time (which names the
    example). Under DP the loss is vmapped for training anyway."""
    from torch.func import vmap

    n = int(out.shape[0])
    others = torch.tensor([[j for j in range(n) if j != i] for i in range(n)])
    try:
        alone = vmap(lambda o, t: task.loss(o.unsqueeze(0), t.unsqueeze(0)))(out, y)
        rest = vmap(task.loss)(out[others], y[others])
    except Exception:  # noqa: BLE001 - any failure: the one-by-one probe decides
        return False
    return (isinstance(alone, torch.Tensor) and isinstance(rest, torch.Tensor)
            and _close(alone.reshape(-1), full) and _close(rest, full[others]))


def chunk_rows(params: list[nn.Parameter] | list[torch.Tensor]) -> int:
    """Rows per chunk of per-example gradients (at least one): :data:`PER_EXAMPLE_BYTES` over
    one example's gradient size."""
    per_row = sum(p.numel() * p.element_size() for p in params)
    return max(1, PER_EXAMPLE_BYTES // max(1, per_row))


@dataclass
class _DPState:
    noise_multiplier: float
    max_grad_norm: float
    expected_batch: float
    generator: torch.Generator


class _Guard:
    """Everything the trainer re-checks around task code and after every step."""

    def __init__(self, task: Task, model: nn.Module, base_opt: torch.optim.Optimizer,
                 dp_opt: DPOptimizer | None, dp: _DPState | None, settings: TrainSettings,
                 params: list[nn.Parameter]) -> None:
        self.task, self.model, self.base_opt, self.dp_opt, self.dp = task, model, base_opt, \
            dp_opt, dp
        self.settings, self.params = settings, params
        self.groups = [dict((k, v) for k, v in g.items() if k != "params")
                       for g in base_opt.param_groups]
        self.steps = 0
        from torch.optim import optimizer as torch_optimizer

        self.global_hooks = (torch_optimizer._global_optimizer_pre_hooks,
                             torch_optimizer._global_optimizer_post_hooks)
        self.global_hook_keys = tuple(set(h) for h in self.global_hooks)
        self.sgd_buf: list[torch.Tensor | None] = [None] * len(params)
        adam = settings.optimizer == "adam"
        self.adam_m = [torch.zeros_like(p, dtype=torch.float64) if adam else None
                       for p in params]
        self.adam_v = [torch.zeros_like(p, dtype=torch.float64) if adam else None
                       for p in params]
        self.clipped: list[torch.Tensor | None] = [None] * len(params)
        self.replay: torch.Generator | None = None
        if dp is not None:
            self.replay = torch.Generator()
            self.replay.set_state(dp.generator.get_state())
        # where the trainable parameters sit in state() (parameters first, then buffers)
        everything = list(model.parameters())
        self.trainable_at = [next(j for j, q in enumerate(everything) if q is p) for p in params]
        self.fixed_at = [j for j in range(len(everything) + len(list(model.buffers())))
                         if j not in self.trainable_at]

    def refuse(self, detail: str) -> TaskError:
        for hooks, keep in zip(self.global_hooks, self.global_hook_keys, strict=True):
            for key in [k for k in hooks if k not in keep]:
                del hooks[key]  # hooks task code added to every optimiser of the process
        changed = _tampered_functions()
        if changed:
            detail += f" (replaced and now restored: {', '.join(changed)})"
        return TaskError("task-tampered", f"task {self.task.name}: {detail}")

    def state(self) -> list[torch.Tensor]:
        return [t.detach().clone() for t in (*self.model.parameters(), *self.model.buffers())]

    def unchanged(self, before: list[torch.Tensor], what: str, *,
                  fixed_only: bool = False) -> None:
        """The model's parameters and buffers are still ``before`` (a :meth:`state`);
        ``fixed_only``: only the ones the optimiser does not train."""
        after = [t.detach() for t in (*self.model.parameters(), *self.model.buffers())]
        if len(after) != len(before):
            raise self.refuse(f"{what} changed the model's parameters or buffers")
        pairs = zip(after, before, strict=True) if not fixed_only else \
            ((after[j], before[j]) for j in self.fixed_at)
        if any(a.shape != b.shape or not torch.equal(a, b) for a, b in pairs):
            raise self.refuse(f"{what} changed the model's parameters or buffers")

    def trainable(self, state: list[torch.Tensor]) -> list[torch.Tensor]:
        """The trainable parameters' entries of a :meth:`state`."""
        return [state[j] for j in self.trainable_at]

    def check_setup(self) -> None:
        """Functions, optimiser hyper-parameters and DP settings are still the site's."""
        changed = _tampered_functions()
        if changed:
            raise TaskError("task-tampered", f"task {self.task.name}: task code replaced "
                            f"{', '.join(changed)} (restored; refused)")
        groups = self.base_opt.param_groups
        if len(groups) != len(self.groups) or any(
                [id(p) for p in g["params"]] != [id(p) for p in self.params] for g in groups):
            raise self.refuse("the optimiser's parameters were changed")
        for want, g in zip(self.groups, groups, strict=True):
            for key, value in want.items():
                if key not in g or not _same(g[key], value):
                    raise self.refuse(f"the optimiser's {key} was changed")
        if (self.base_opt._optimizer_step_pre_hooks or self.base_opt._optimizer_step_post_hooks
                or any(set(h) != keep for h, keep in zip(self.global_hooks,
                                                         self.global_hook_keys, strict=True))):
            raise self.refuse("hooks were added to the optimiser")
        if self.dp_opt is None or self.dp is None:
            return
        o, s = self.dp_opt, self.dp
        checks = {
            "noise_multiplier": o.noise_multiplier == s.noise_multiplier,
            "max_grad_norm": o.max_grad_norm == s.max_grad_norm,
            "expected_batch_size": o.expected_batch_size == s.expected_batch,
            "generator": o.generator is s.generator,
            "loss_reduction": o.loss_reduction == "mean",
            "secure_mode": o.secure_mode is False,
            "step_skip_queue": not o._step_skip_queue,
            "step_hook": o.step_hook is None,
            "original_optimizer": o.original_optimizer is self.base_opt,
            "class": type(o) is DPOptimizer,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise self.refuse(f"the DP optimiser's {', '.join(bad)} changed")

    def accumulate(self, per_example: list[torch.Tensor]) -> None:
        """Clip one chunk's per-example gradients and add them to the site's clipped sum.

        This is the step's only clipping (Opacus's formula: factor ``min(1, C / (norm +
        1e-6))`` of each example's whole-gradient L2 norm, sum by ``einsum``): Opacus's
        ``clip_and_accumulate`` is not called, it gets a copy of this sum to add noise to
        (:meth:`hand_to_opacus`), and :meth:`check_noisy_grad` compares its result with this
        sum plus the regenerated noise."""
        assert self.dp is not None
        n = int(per_example[0].shape[0]) if per_example else 0
        if not n:
            return
        norms = torch.stack([g.reshape(n, -1).norm(2, dim=-1) for g in per_example],
                            dim=1).norm(2, dim=1)
        factor = (self.dp.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for i, g in enumerate(per_example):
            summed = torch.einsum("i,i...", factor, g)
            self.clipped[i] = summed if self.clipped[i] is None else \
                self.clipped[i].add_(summed)  # type: ignore[union-attr]

    def hand_to_opacus(self) -> None:
        """Give Opacus a COPY of the site's clipped sum as ``summed_grad`` (a copy: its noise
        step, or code replacing it, must not reach the sum the check compares with)."""
        for i, p in enumerate(self.params):
            summed = self.clipped[i]
            p.summed_grad = torch.zeros_like(p) if summed is None else summed.clone()
            # scale_grad reads the number of accumulated batches off grad_sample (a tensor:
            # one batch); the per-example gradients themselves are no longer needed
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)

    def check_noisy_grad(self) -> None:
        """p.grad after Opacus's noise and scaling == (the site's clipped sum + noise) / (q n),
        the noise regenerated by the guard's own generator, which follows the site's noise
        generator draw for draw from its seed (a generator re-seeded or advanced by task
        code between steps gives other noise than the guard's: refused)."""
        assert self.dp is not None and self.replay is not None
        s = self.dp
        std = s.noise_multiplier * s.max_grad_norm
        for i, p in enumerate(self.params):
            summed = self.clipped[i]
            self.clipped[i] = None
            if summed is None:
                summed = torch.zeros_like(p)
            noise = _NORMAL(0.0, std, p.shape, generator=self.replay) if std > 0 else \
                torch.zeros_like(p)
            expected = summed.add_(noise).div_(s.expected_batch)
            del noise
            if p.grad is None or not _within(p.grad, expected):
                raise self.refuse("the noisy gradient differs from the site's recomputation "
                                  "(noise or clipping was altered)")
        if not torch.equal(self.replay.get_state(), s.generator.get_state()):
            raise self.refuse("the noise generator was used outside the site's noise step")

    def check_update(self, before: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """The optimiser's step == an independent float64 SGD/Adam step on ``grads``."""
        self.steps += 1
        st = self.settings
        for i, (p, p0, g) in enumerate(zip(self.params, before, grads, strict=True)):
            if st.optimizer == "sgd" and st.momentum:
                g64 = g.to(torch.float64)
                buf = self.sgd_buf[i]
                self.sgd_buf[i] = g64 if buf is None else buf.mul_(st.momentum).add_(g64)
            if st.optimizer == "adam":
                g64 = g.to(torch.float64)
                b1, b2 = ADAM_BETAS
                self.adam_m[i].mul_(b1).add_(g64, alpha=1 - b1)  # type: ignore[union-attr]
                self.adam_v[i].mul_(b2).addcmul_(g64, g64, value=1 - b2)  # type: ignore[union-attr]
            # element slices: the float64 temporaries stay small at any model size
            flat = (p.detach().reshape(-1), p0.reshape(-1), g.reshape(-1))
            for lo in range(0, flat[0].numel(), CHECK_ELEMENTS):
                part = slice(lo, lo + CHECK_ELEMENTS)
                if not self._update_ok(i, *(t[part] for t in flat), part):
                    raise self.refuse("the optimiser's update differs from the site's "
                                      "recomputation (the update was altered)")

    def _update_ok(self, i: int, p: torch.Tensor, p0: torch.Tensor, g: torch.Tensor,
                   part: slice) -> bool:
        """One slice of parameter ``i``: the step taken == the recomputation. Plain SGD is
        recomputed as the optimiser computes it, ``p0 - lr g`` in the parameter's own dtype,
        and must match within a few roundings (tighter than the float64 check below, and a
        third of its memory traffic); momentum and Adam keep float64 state, compared with
        ``CHECK_RTOL``."""
        st = self.settings
        if st.optimizer == "sgd" and not st.momentum:
            expected = torch.add(p0, g, alpha=-st.lr)
            if torch.equal(p, expected):  # torch's CPU SGD step is this very kernel call
                return True
            # else |p - e| <= k eps (|p0| + |e|) + tiny, elementwise, in three temporaries;
            # max(err - tol) <= 0 is all(err <= tol) (float subtraction keeps the sign; a NaN
            # anywhere makes the max NaN: refused)
            info = torch.finfo(p.dtype)
            err = torch.sub(p, expected).abs_()
            tol = expected.abs_().add_(p0.abs()).mul_(SGD_ROUNDINGS * info.eps).add_(info.tiny)
            return bool(err.sub_(tol).amax() <= 0)
        if st.optimizer == "sgd":
            buf = self.sgd_buf[i]
            g64 = buf.reshape(-1)[part] if st.momentum and buf is not None else \
                g.to(torch.float64)
            delta = g64.mul(-st.lr)
        else:
            c1, c2 = 1 - ADAM_BETAS[0] ** self.steps, 1 - ADAM_BETAS[1] ** self.steps
            m = self.adam_m[i].reshape(-1)[part]  # type: ignore[union-attr]
            v = self.adam_v[i].reshape(-1)[part]  # type: ignore[union-attr]
            delta = -st.lr / c1 * m / ((v / c2).sqrt() + ADAM_EPS)
        p0_64 = p0.to(torch.float64)
        actual = p.to(torch.float64) - p0_64
        tol = CHECK_RTOL * (delta.abs() + st.lr * 1e-3) + 1e-7 + FLOAT32_ULP * p0_64.abs()
        return bool(((actual - delta).abs() <= tol).all())


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    return type(a) is type(b) and a == b


def _within(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Every element of ``actual`` within ``CHECK_RTOL * max(max |expected|, 1e-3)`` of
    ``expected`` (a NaN or infinity on either side fails: its difference is NaN). One
    temporary and two reductions: ``max |d| <= tol`` is ``all(|d| <= tol)``."""
    if actual.shape != expected.shape:
        return False
    if not expected.numel():
        return True
    low, high = torch.aminmax(expected)
    tol = CHECK_RTOL * torch.maximum(low.abs(), high.abs()).clamp(min=1e-3)
    diff = torch.sub(actual.detach(), expected).abs_()
    return bool(diff.amax() <= tol)


# --------------------------------------------------------------------------- training


def _check_data(loaded: LoadedTask, data: TaskData) -> None:
    task = loaded.task
    want = (tuple(f.name for f in task.features), tuple(f.name for f in task.targets))
    if (data.features, data.targets) != want:
        raise TaskError("task-data", f"task {task.name}: the data holds fields "
                        f"{list(data.features)} -> {list(data.targets)}, the task declares "
                        f"{list(want[0])} -> {list(want[1])}")


def _per_example_grads(task: Task, model: nn.Module, xb: torch.Tensor, yb: torch.Tensor,
                       params: list[nn.Parameter]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-example gradients and losses, one example at a time (vmap of grad)."""
    from torch.func import functional_call, grad_and_value, vmap

    names = {id(p): n for n, p in model.named_parameters()}
    trainable = {names[id(p)]: p.detach() for p in params}
    fixed = {n: t.detach() for n, t in (*model.named_parameters(), *model.named_buffers())
             if n not in trainable}

    def one(weights: dict[str, torch.Tensor], x: torch.Tensor,
            y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (weights, fixed), (x.unsqueeze(0),))
        return task.loss(out, y.unsqueeze(0)).sum()

    grads, losses = _task_call(task, "model/loss (per example)", lambda: vmap(
        grad_and_value(one), in_dims=(None, 0, 0), randomness="different")(trainable, xb, yb))
    return [grads[names[id(p)]] for p in params], losses


def _dp_grads(task: Task, model: nn.Module, xb: torch.Tensor, yb: torch.Tensor,
              params: list[nn.Parameter], guard: _Guard, before: list[torch.Tensor],
              chunk: int) -> torch.Tensor:
    """One DP step's per-example gradients, ``chunk`` rows at a time, each chunk clipped and
    summed by the guard as soon as it is computed (the per-example gradients of one chunk
    at a time in memory). Returns the per-example losses."""
    b = int(xb.shape[0])
    if not b:
        guard.check_setup()
        return torch.zeros(0)
    losses = []
    for lo in range(0, b, chunk):
        grads, chunk_losses = _per_example_grads(task, model, xb[lo:lo + chunk],
                                                 yb[lo:lo + chunk], params)
        losses.append(chunk_losses.detach())
        guard.unchanged(before, "the model or loss")
        guard.check_setup()
        guard.accumulate([g.detach() for g in grads])
        del grads
    return torch.cat(losses)


def train_task(loaded: LoadedTask, global_params: Mapping[str, np.ndarray], data: TaskData,
               settings: TrainSettings, seed: int, *, secure_noise: bool = False) -> TrainResult:
    """Train ``loaded``'s model from ``global_params`` on ``data.train_*`` for one round.

    Exactly ``settings.local_steps`` steps; under DP (``settings.noise_multiplier`` set) the
    site's noise, clip and Poisson sampling (see the module docstring for what is checked).
    Returns the new parameters and the charge actually used (``noise_multiplier``,
    ``sample_rate``, ``steps`` read back from the optimiser and the loop), ``max_grad_norm``,
    the task and dataset digests. Deterministic given ``seed`` unless ``secure_noise``.
    Raises :class:`TaskError` (``task-model``, ``task-loss``, ``task-error``,
    ``task-tampered``, ``parameters-invalid``, ``task-data``) or ``ValueError`` for settings.

    One call at a time per process (a lock): training seeds and restores torch's global RNG
    for the task's own randomness, and the guard's checks of process-wide state (replaced
    functions, global optimiser hooks) must not see another training's; threads serving other
    sites meanwhile overlap everything else (I/O, fsync, encryption).
    """
    with _TRAIN_LOCK:
        return _train_task(loaded, global_params, data, settings, seed, secure_noise)


def _train_task(loaded: LoadedTask, global_params: Mapping[str, np.ndarray], data: TaskData,
                settings: TrainSettings, seed: int, secure_noise: bool) -> TrainResult:
    task = loaded.task
    _check_data(loaded, data)
    if data.n_train < 1:
        raise TaskError("task-data", f"dataset {data.dataset} has no training rows")
    changed = _tampered_functions()
    if changed:
        raise TaskError("task-tampered", f"replaced before training: {', '.join(changed)} "
                        "(restored; refused)")
    model = prepare_model(loaded, global_params, dp=settings.dp)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TaskError("task-model", f"task {task.name}: the model has no trainable parameters")
    anchor = [p.detach().clone() for p in params] if settings.proximal_mu > 0 else None
    sample_seed, noise_seed = _seeds(seed, secure_noise)
    rng_seed = _seeds(seed ^ 0x5EED5, secure_noise)[0]
    sampler = torch.Generator().manual_seed(sample_seed)
    x_all = torch.from_numpy(np.ascontiguousarray(data.train_x, dtype=np.float32))
    y_all = torch.from_numpy(np.ascontiguousarray(data.train_y, dtype=np.float32))
    n = data.n_train
    expected_batch = settings.sample_rate * n
    base_opt = _make_optimizer(params, settings)

    dp_opt: DPOptimizer | None = None
    dp_state: _DPState | None = None
    if settings.dp:
        generator = torch.Generator().manual_seed(noise_seed)
        dp_state = _DPState(float(settings.noise_multiplier or 0.0),
                            float(settings.max_grad_norm), expected_batch, generator)
        dp_opt = DPOptimizer(base_opt, noise_multiplier=dp_state.noise_multiplier,
                             max_grad_norm=dp_state.max_grad_norm,
                             expected_batch_size=expected_batch,  # type: ignore[arg-type]
                             loss_reduction="mean", generator=generator)
    # The guard records the site's settings before any task code runs again.
    guard = _Guard(task, model, base_opt, dp_opt, dp_state, settings, params)
    chunk = chunk_rows(params)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(rng_seed)  # dropout and other randomness of the task's model
        model.train()
        before = guard.state()
        check_loss(task, model, x_all, y_all, decomposable=settings.dp)
        guard.unchanged(before, "the model or loss (probe)")
        losses_sum, seen = 0.0, 0
        for _ in range(settings.local_steps):
            if settings.sample_rate >= 1.0:
                xb, yb = x_all, y_all
            else:
                mask = torch.rand(n, generator=sampler) < settings.sample_rate
                xb, yb = x_all[mask], y_all[mask]
            b = int(xb.shape[0])
            guard.check_setup()
            (dp_opt or base_opt).zero_grad(set_to_none=True)
            before = guard.state()
            if dp_opt is not None:
                losses = _dp_grads(task, model, xb, yb, params, guard, before, chunk)
                # Opacus's pre_step without its clipping (the guard's sum is the clipped
                # one; no skipped step and no step hook: check_setup): noise, then scale
                guard.hand_to_opacus()
                dp_opt.add_noise()
                dp_opt.scale_grad()
                guard.check_noisy_grad()
            else:
                if b:
                    out = _task_call(task, "model forward", lambda xb=xb: model(xb))
                    losses = _task_call(task, "loss", lambda out=out, yb=yb: task.loss(out, yb))
                    if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (b,):
                        raise TaskError("task-loss", f"task {task.name}: loss must return "
                                        f"shape ({b},)")
                    _task_call(task, "backward", lambda losses=losses: losses.sum().backward())
                else:
                    losses = torch.zeros(0)
                guard.unchanged(before, "the model or loss")
                guard.check_setup()
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    else:
                        p.grad /= expected_batch
            if b:
                losses_sum += float(losses.detach().sum())
                seen += b
            if anchor is not None:
                for p, p0 in zip(params, anchor, strict=True):
                    p.grad.add_(p.detach() - p0, alpha=settings.proximal_mu)  # type: ignore[union-attr]
            grads_used = [p.grad.detach().clone() for p in params]  # type: ignore[union-attr]
            guard.check_setup()  # nothing but torch's own step runs from here
            base_opt.step()
            # the step is checked from the parameters at the START of the step (``before``):
            # a parameter moved anywhere in the step, not only by the optimiser, is refused
            guard.check_update(guard.trainable(before), grads_used)
            guard.unchanged(before, "the step", fixed_only=True)
        guard.check_setup()

    steps = guard.steps
    if steps != settings.local_steps:
        raise guard.refuse(f"{steps} steps were taken, {settings.local_steps} planned")
    new_params = get_parameters(model)
    bad = [k for k, v in new_params.items() if not np.isfinite(v).all()]
    if bad:
        raise ValueError(f"training diverged: parameter {bad[0]!r} is not finite (lower lr)")
    log.debug("task %s on dataset %s: %d local steps (%s), mean batch %.1f", task.name,
              data.dataset, steps, "dp" if settings.dp else "no dp", seen / steps)
    return TrainResult(
        parameters=new_params, steps=steps, num_examples=n,
        train_loss=float(losses_sum / seen) if seen else float("nan"),
        noise_multiplier=float(dp_opt.noise_multiplier) if dp_opt is not None else None,
        sample_rate=float(settings.sample_rate),
        max_grad_norm=float(dp_opt.max_grad_norm) if dp_opt is not None else None,
        task_digest=loaded.digest, dataset_digest=data.digest)


# --------------------------------------------------------------------------- evaluation


def evaluate_task(loaded: LoadedTask, params: Mapping[str, np.ndarray], data: TaskData, *,
                  split: str = "test") -> dict[str, float]:
    """The task's metrics of ``params`` on ``data``'s ``split`` (default test).

    Returns every metric by name, ``loss`` (mean per-example loss) and ``num-examples``.
    Metrics may be NaN (e.g. no comparable pairs); a metric that is not a real number is
    ``task-metric``. These values leave the site without DP noise.
    """
    task = loaded.task
    _check_data(loaded, data)
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    x = getattr(data, f"{split}_x")
    y = getattr(data, f"{split}_y")
    if x.shape[0] == 0:
        raise TaskError("task-data", f"dataset {data.dataset} has no {split} rows to evaluate")
    model = prepare_model(loaded, params, dp=False)
    model.eval()
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))
    with torch.no_grad():
        out = _task_call(task, "model forward", lambda: model(xt))
        losses = _task_call(task, "loss", lambda: task.loss(out, yt))
    if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (x.shape[0],):
        raise TaskError("task-loss", f"task {task.name}: loss must return shape "
                        f"({x.shape[0]},)")
    outputs = out.detach().cpu().numpy()
    result: dict[str, float] = OrderedDict()
    for name, fn in task.metrics.items():
        try:
            value = fn(outputs, y)
        except Exception as exc:
            raise TaskError("task-metric", f"task {task.name}: metric {name} raised "
                            f"{type(exc).__name__}: {exc}") from exc
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise TaskError("task-metric", f"task {task.name}: metric {name} returned a "
                            f"{type(value).__name__}, expected a number") from None
        if math.isinf(number):
            raise TaskError("task-metric", f"task {task.name}: metric {name} is infinite")
        result[name] = number
    result["loss"] = float(losses.detach().to(torch.float64).mean())
    result["num-examples"] = float(x.shape[0])
    return dict(result)
