"""Torch classifiers as unlearning targets: architectures, gradient-restriction training, persistence.

A classifier is described by a small JSON-able *spec* (architecture and sizes) stored in each version's
meta.json, so any version can be rebuilt from its safetensors file alone.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from adapters.base import Change, Engine, Forget, InvalidForget, NothingToForget
from adapters.datasets import LabeledSet, RowSelection, Split
from adapters.devices import device_of

WEIGHTS_FILE = "model.safetensors"


class MLP(nn.Module):
    def __init__(self, input_shape: Iterable[int], hidden: Iterable[int], num_classes: int):
        super().__init__()
        dims = [math.prod(input_shape), *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in itertools.pairwise(dims):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)

    def linear_entry(self) -> tuple[nn.Module, nn.Module]:
        """(entry, rest): self(x) == rest(entry(x)), entry's output linear in entry's own parameters, each of whose
        first dimension is the output's dimension 1 (so a layer of the parameters stacked gives both outputs)."""
        return self.net[:2], self.net[2:]


class MaxPool2x2(nn.Module):
    """nn.MaxPool2d(2) with the same results. Without autograd (inference, IAU's trial steps) it takes the
    maximum of each pair of rows, then of each pair of columns, which on CPU is several times faster than torch's
    max_pool2d kernel at the batch sizes a request evaluates (that kernel was the largest cost of an IAU request
    on the CNN); while training, torch's kernel, whose backward is the faster one and sends a tie's gradient to
    one input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return F.max_pool2d(x, 2)
        x = x[..., : x.shape[-2] // 2 * 2, : x.shape[-1] // 2 * 2]  # floor mode: an odd last row/column is dropped
        rows = x.unflatten(-2, (-1, 2))  # (..., H/2, 2, W): each pair of rows side by side
        pairs = torch.maximum(rows[..., 0, :], rows[..., 1, :])
        return torch.maximum(pairs[..., 0::2], pairs[..., 1::2])


class SmallCNN(nn.Module):
    """LeNet-style, as in IAU's released code (conv 6-16, fc 120-84), sized for 28x28 or 8x8 inputs. Each
    convolution is followed by its max-pooling, then the ReLU: the same function as ReLU then pooling (a maximum
    of ReLUs is the ReLU of the maximum), with the ReLU on a quarter of the values. (Versions saved with the
    other order load unchanged: the layers with weights keep their places.)"""

    def __init__(self, input_shape: Iterable[int], num_classes: int, channels=(6, 16), fc=(120, 84)):
        super().__init__()
        c, h, w = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, channels[0], 3, padding=1), MaxPool2x2(), nn.ReLU(),
            nn.Conv2d(channels[0], channels[1], 3, padding=1), MaxPool2x2(), nn.ReLU(),
        )
        flat = channels[1] * (h // 4) * (w // 4)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(flat, fc[0]), nn.ReLU(), nn.Linear(fc[0], fc[1]), nn.ReLU(),
                                  nn.Linear(fc[1], num_classes))

    def forward(self, x):
        return self.head(self.features(x))

    def linear_entry(self) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
        """(entry, rest) as MLP.linear_entry's. Rest is a function, not a module: building nn.Sequential views cost
        a request more than running them."""
        return self.features[0], self._after_entry

    def _after_entry(self, h: torch.Tensor) -> torch.Tensor:
        for layer in itertools.islice(self.features, 1, None):
            h = layer(h)
        return self.head(h)


def build(spec: dict) -> nn.Module:
    """An untrained module from its spec, e.g. {"arch": "mlp", "input_shape": [1,28,28], ...}, initialised
    deterministically from spec["init_seed"]."""
    torch.manual_seed(int(spec.get("init_seed", 0)))
    return _construct(spec)


def _construct(spec: dict) -> nn.Module:
    if spec["arch"] == "mlp":
        return MLP(spec["input_shape"], spec.get("hidden", [256, 128]), spec["num_classes"])
    if spec["arch"] == "cnn":
        return SmallCNN(spec["input_shape"], spec["num_classes"], channels=tuple(spec.get("channels", (6, 16))))
    raise ValueError(f"unknown classifier arch {spec['arch']!r} (known: mlp, cnn)")


def with_weights(spec: dict, state: dict[str, torch.Tensor]) -> nn.Module:
    """The architecture of `spec` holding exactly `state`, on the state's device. Built on the meta device, so no
    random initialisation is computed only to be overwritten (it was a third of a request's overhead)."""
    with torch.device("meta"):
        module = _construct(spec)  # no seeding either: torch.manual_seed formats stack traces per device type
    module.load_state_dict(state, assign=True)
    return module.eval()


def copy_of(spec: dict, module: nn.Module) -> nn.Module:
    """A separate module of `spec` holding copies of `module`'s weights (in eval mode). Much cheaper than
    copy.deepcopy, which walks every Python attribute of every submodule."""
    return with_weights(spec, {k: v.detach().clone() for k, v in module.state_dict().items()})


def load_weights(spec: dict, directory: Path, device: torch.device | str = "cpu") -> nn.Module:
    """A version's weights, read straight onto `device` (the model's configured device)."""
    return with_weights(spec, load_file(str(directory / WEIGHTS_FILE), device=str(device)))


def state_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the module's weights on the CPU, as they are saved: the file is the same whatever the device."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


class WeightChange(Change):
    """A full new set of classifier weights: a new model version. Rollback = load the parent's file."""

    kind = "version"

    def __init__(self, state: dict[str, torch.Tensor], metrics: dict[str, float], *, model: nn.Module | None = None,
                 **kw):
        """`state`: the weights on the CPU (`state_of`), as saved. `model`, when the engine has it, is a module on
        the model's device holding exactly `state` that the engine will not touch again; it saves rebuilding one
        for the next request."""
        super().__init__(metrics, **kw)
        self.state = state
        self._model = model

    def save(self, directory: Path) -> None:
        save_file(self.state, str(directory / WEIGHTS_FILE))

    def module(self, spec: Any) -> nn.Module:  # the architecture's spec: a dict here, a DDPMSpec for DDPMs
        return self._model.eval() if self._model is not None else with_weights(spec, self.state)


class RequestRows(NamedTuple):
    """What one request reads: the rows to forget and the two probes on the model's device, the remaining rows
    selected but not copied out (an engine copies them where it needs them whole)."""

    forget: LabeledSet
    remaining: RowSelection
    skipped: tuple[int, ...]  # ids named again, already forgotten
    retain_probe: LabeledSet
    test_probe: LabeledSet


@dataclass
class ClassifierTarget:
    """A classifier as it is now, with the registered data its engines need."""

    name: str
    version: str
    spec: dict
    model: nn.Module  # active weights; engines copy before changing
    data: Split
    forgotten: frozenset[int] = field(default_factory=frozenset)  # ids forgotten along the active lineage

    @property
    def remaining(self) -> LabeledSet:
        """The training rows not yet forgotten, copied out (select_remaining selects them without a copy)."""
        return self.select_remaining().rows()

    def select_remaining(self, also_forgetting: torch.Tensor | None = None) -> RowSelection:
        """The training rows that remain, once `also_forgetting` (ids) is forgotten too, not yet copied out."""
        gone = torch.as_tensor(sorted(self.forgotten), dtype=torch.int64)
        if also_forgetting is not None:
            gone = torch.cat([gone, also_forgetting.to("cpu", torch.int64)])
        train = self.data.train
        return RowSelection(train, torch.nonzero(~torch.isin(train.ids, gone)).squeeze(1))

    def copy_model(self) -> nn.Module:
        """A module of its own holding the active weights (in eval mode): what an engine changes."""
        return copy_of(self.spec, self.model)

    def resolve(self, forget: Forget) -> tuple[LabeledSet, tuple[int, ...]]:
        """The training rows a request names. Unknown ids reject the request; already-forgotten ids are skipped
        (a sample is never forgotten twice). Returns (rows to forget now, ids skipped)."""
        if forget.kind == "class":
            if forget.class_label is None or not 0 <= forget.class_label < self.data.num_classes:
                raise InvalidForget(f"class {forget.class_label} outside 0..{self.data.num_classes - 1}")
            ids = self.data.train.ids[self.data.train.y == forget.class_label].tolist()
        elif forget.kind == "sample_ids":
            ids = list(dict.fromkeys(forget.sample_ids))
            known = set(self.data.train.ids.tolist())
            unknown = [i for i in ids if i not in known]
            if unknown:
                raise InvalidForget(f"{len(unknown)} unknown sample id(s), first {unknown[:5]}; "
                                    f"registered ids are 0..{len(self.data.train) - 1}")
        else:
            raise InvalidForget(f"classifier models take forget.sample_ids or forget.class, not {forget.kind}")
        skipped = tuple(i for i in ids if i in self.forgotten)
        fresh = [i for i in ids if i not in self.forgotten]
        return self.data.train.select_ids(fresh), skipped


    def split(self, forget: Forget) -> tuple[LabeledSet, RowSelection, tuple[int, ...]]:
        """(rows to forget now, rows that remain after, ids skipped as already forgotten). Raises NothingToForget
        when every named sample is already forgotten, InvalidForget when it would leave nothing to learn from."""
        forget_rows, skipped = self.resolve(forget)
        if len(forget_rows) == 0:
            raise NothingToForget(len(skipped))
        remaining = self.select_remaining(also_forgetting=forget_rows.ids)
        if len(remaining) == 0:
            raise InvalidForget("request would forget the whole training set")
        return forget_rows, remaining, skipped

    def request_rows(self, forget: Forget, measure_cap: int) -> RequestRows:
        """split(), with the forget rows and a probe of at most `measure_cap` remaining and test rows each moved to
        the model's device once (every trial or pass of the request reads them there)."""
        forget_rows, remaining, skipped = self.split(forget)
        device = device_of(self.model)
        return RequestRows(forget_rows.to(device), remaining, skipped, remaining.sample(measure_cap).to(device),
                           self.data.test.sample(measure_cap).to(device))


class ClassifierEngine(Engine):
    """Shared base of the classifier engines: what they accept is checked the same way."""

    model_kinds = frozenset({"classifier"})

    def validate(self, target: ClassifierTarget, forget: Forget) -> None:
        target.split(forget)


def train_gr(
    module: nn.Module,
    train: LabeledSet,
    *,
    epochs: int = 20,
    alpha: float = 0.005,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    schedule: str = "cosine",
    on_epoch: Callable[[int, float], None] | None = None,
) -> nn.Module:
    """Train with IAU's Gradient Restriction: CE + alpha * sum over parameter tensors of ||grad CE||_2.

    The penalty (double backprop) pushes the model into flat regions, where a single gradient step
    approximates the influence-function removal well. alpha = 0 gives plain training.

    `schedule = "cosine"` anneals Adam's lr to 0 over the run, so training ends settled instead of at the last
    noisy constant-lr step: two models trained on almost the same rows then differ by what the rows taught them,
    not by where the last batches left them, which is what a comparison with retraining needs. "constant"
    keeps lr throughout (IAU's code, which instead early-stops on validation accuracy over up to 200 epochs).
    """
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', not {schedule!r}")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch) \
        if schedule == "cosine" else None
    params = [p for p in module.parameters() if p.requires_grad]
    train = train.to(device_of(module))
    module.train()
    for epoch in range(epochs):
        order = torch.randperm(len(train), generator=g).to(train.x.device)  # drawn on the CPU: same on any device
        total = 0.0
        for start in range(0, len(train), batch_size):
            idx = order[start:start + batch_size]
            ce = F.cross_entropy(module(train.x[idx]), train.y[idx])
            loss = ce
            if alpha > 0:
                grads = torch.autograd.grad(ce, params, create_graph=True)
                loss = ce + alpha * sum(gr.norm() for gr in grads)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += ce.item() * len(idx)
        if on_epoch:
            on_epoch(epoch, total / len(train))
    return module.eval()


def mean_loss_grad(module: nn.Module, rows: LabeledSet, batch_size: int = 2048) -> list[torch.Tensor]:
    """Gradient of the mean cross-entropy over `rows`, one tensor per parameter (summed over batches), on the
    module's device."""
    return mean_loss_grad_and_logits(module, rows, batch_size)[0]


def mean_loss_grad_and_logits(module: nn.Module, rows: LabeledSet, batch_size: int = 2048, *,
                              forward: Callable[[torch.Tensor], torch.Tensor] | None = None
                              ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """mean_loss_grad, and the logits it was taken at (one forward pass for both). `forward`, when given, is the
    module's forward computed another way (e.g. in parts, keeping one part's output)."""
    params = [p for p in module.parameters()]
    total, logits = [torch.zeros_like(p) for p in params], []
    device = device_of(module)
    forward = forward or module
    for start in range(0, len(rows), batch_size):  # rows move a batch at a time (a no-op when already there)
        sl = slice(start, start + batch_size)
        out = forward(rows.x[sl].to(device))
        loss = F.cross_entropy(out, rows.y[sl].to(device), reduction="sum") / len(rows)
        for acc, gr in zip(total, torch.autograd.grad(loss, params), strict=True):
            acc += gr
        logits.append(out.detach())
    return total, torch.cat(logits) if logits else torch.empty(0, device=device)
