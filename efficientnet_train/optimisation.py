"""What the weights are updated by: timm's optimizer and learning-rate schedule, the gradient's clipping, the weights'
moving average (EMA), the gradient scaler, the loss and its class weights, and when early stopping ends a run."""

from __future__ import annotations

import functools
import math

import torch

from . import hyperparameters, multilabel


def create_optimizer(model: torch.nn.Module, hp, lr: float, opt: str) -> torch.optim.Optimizer:
    """timm's optimizer `opt`; with layer_decay < 1 the classifier gets lr and each block below it less,
    so the new head learns at full speed while the pretrained features only adapt."""
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(model, opt=opt, lr=lr, weight_decay=hp.weight_decay,
                               eps=hp.opt_eps, layer_decay=hp.layer_decay if hp.layer_decay < 1 else None)


def create_schedule(optimizer: torch.optim.Optimizer, hp, updates_per_epoch: int, schedule_epoch: int):
    """timm's scheduler `hp.sched`, stepped every update (smooth warmup and decay even with a handful of steps an
    epoch), over schedule epochs of `schedule_epoch` updates (`schedule_epoch_updates`)."""
    from timm.scheduler import create_scheduler_v2

    scheduler, _ = create_scheduler_v2(
        optimizer, sched=hp.sched, num_epochs=hp.epochs * updates_per_epoch / schedule_epoch,
        decay_epochs=hp.decay_epochs, decay_rate=hp.decay_rate, warmup_lr=hp.warmup_lr,
        warmup_epochs=hp.warmup_epochs, step_on_epochs=False, updates_per_epoch=schedule_epoch)
    return scheduler


def schedule_epoch_updates(hp, updates_per_epoch: int) -> int:
    """The updates an epoch lasts for the learning-rate schedule, warmup and early stopping: a pass over the
    training set, but at least MIN_SCHEDULE_EPOCH_UPDATES, as far as `epochs` leaves room for the warmup and
    the first decay: on a set of a few hundred images a pass is about ten updates, and decays every 2.4 passes
    would end the run after a few dozen updates at a useful rate (docs/quality-log.md)."""
    run = hp.epochs * updates_per_epoch
    room = run / max(hp.warmup_epochs + hp.decay_epochs, 1.0)
    return max(updates_per_epoch, min(hyperparameters.MIN_SCHEDULE_EPOCH_UPDATES, round(room)))


def training_tools(model: torch.nn.Module, hp, amp_dtype: torch.dtype | None):
    """The weights' moving average (EMA, if asked for) and, for float16 only, the gradient scaler: what the job
    trains with besides the optimizer."""
    # The plain mean of the start (the probe) and every update until the decay is reached (power 1; -1 counts the
    # start): the first updates, which lose some of the probe's answers, are averaged with it (docs/quality-log.md).
    ema = model_ema(model, decay=hp.model_ema_decay, use_warmup=True, warmup_power=1.0,
                    update_after_step=-1) if hp.model_ema else None
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    return ema, scaler


def model_ema(model: torch.nn.Module, **settings):
    """timm's ModelEmaV3, updating the same tensors with the same arithmetic, but from lists of them made at the
    first update: timm's own update walks both models' state_dict() every step, a thousand small operations of
    the main thread that a fast GPU waits for (docs/benchmarks.md). The lists hold the tensors themselves, which
    loading a checkpoint and the optimizer change in place."""
    from timm.utils import ModelEmaV3

    class ModelEma(ModelEmaV3):
        tensors = None

        def apply_update_(self, model, decay):
            if self.tensors is None:
                pairs = list(zip(self.module.state_dict().values(), model.state_dict().values()))
                averaged = [pair for pair in pairs if pair[0].is_floating_point()]
                copied = [pair for pair in pairs if not pair[0].is_floating_point()]  # the batch counters
                self.tensors = ([ours for ours, _ in averaged], [theirs for _, theirs in averaged],
                                [ours for ours, _ in copied], [theirs for _, theirs in copied])
            averages, sources, counters, counts = self.tensors
            self._foreach_lerp_(averages, sources, weight=1. - decay)
            if counters:
                torch._foreach_copy_(counters, counts)

    return ModelEma(model, **settings)


def clip_gradients(parameters, clip_grad: float, clip_mode: str) -> None:
    """timm's dispatch_clip_grad, but its adaptive clipping (agc) over every tensor at once on a GPU
    (adaptive_clip_at_once), wherever the tensors allow it (at_once_groups)."""
    from timm.utils import dispatch_clip_grad

    params = [p for p in parameters if p.grad is not None]
    if clip_mode != "agc":
        dispatch_clip_grad(params, clip_grad, mode=clip_mode)
        return
    groups, rest = at_once_groups(params)
    for group in groups:
        adaptive_clip_at_once(group, clip_grad)
    if rest:
        dispatch_clip_grad(rest, clip_grad, mode=clip_mode)


def at_once_groups(params: list[torch.Tensor], devices: tuple[str, ...] = ("cuda",)) -> tuple[list[list], list]:
    """The tensors adaptive_clip_at_once can take, by device and dtype, and the rest, for timm's loop: a tensor of
    another device type (a CPU launches nothing, and timm's loop passes over memory fewer times there) or whose
    units' elements are not together in memory."""
    groups: dict[tuple, list] = {}
    rest = []
    for p in params:
        if p.device.type in devices and _units_in_blocks(p) and _units_in_blocks(p.grad):
            groups.setdefault((p.device, p.dtype), []).append(p)
        else:
            rest.append(p)
    return list(groups.values()), rest


def adaptive_clip_at_once(params: list[torch.Tensor], clip_grad: float) -> None:
    """timm's adaptive_clip_grad, its arithmetic in a few operations over every tensor: timm's walks the tensors one
    by one, about 13 operations each, whose launches took 38 to 54% of efficientnet_b3's step on an H200
    (docs/benchmarks.md). Each unit (a row of a weight, all of a tensor of one dimension or none) keeps its gradient
    if the gradient's norm is under clip_grad times the weights' norm (at least 1e-3), else it is scaled down to
    that. The tensors share a device and a dtype, and each unit's elements lie together in memory, in the weights
    and in the gradient."""
    lengths, numels = _unit_lengths(tuple(p.shape for p in params), params[0].device)
    grads = [_flat(p.grad.detach()) for p in params]
    max_norm = _unit_norms([_flat(p.detach()) for p in params], lengths).clamp_(min=1e-3).mul_(clip_grad)
    grad_norm = _unit_norms(grads, lengths)
    scale = torch.where(grad_norm < max_norm, 1.0, max_norm / grad_norm.clamp(min=1e-6))
    torch._foreach_mul_(grads, list(scale.repeat_interleave(lengths, output_size=sum(numels)).split(numels)))


def _units_in_blocks(t: torch.Tensor) -> bool:
    """Whether each unit's elements lie together in memory (contiguous, or a channels-last convolution's weights)."""
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


@functools.lru_cache(maxsize=4)
def _unit_lengths(shapes: tuple, device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """The elements of each unit, tensor after tensor (timm's unitwise_norm: a row of dim 0, or a whole tensor of
    one dimension or none), and each tensor's elements."""
    numels = [math.prod(shape) for shape in shapes]
    rows = [shape[0] if len(shape) > 1 else 1 for shape in shapes]
    lengths = [numel // row for numel, row in zip(numels, rows) for _ in range(row)]
    return torch.tensor(lengths, device=device), numels


def _unit_norms(flat_tensors: list[torch.Tensor], lengths: torch.Tensor) -> torch.Tensor:
    flat = torch.cat(flat_tensors)  # a new tensor: squared in place, in float32 at least
    squares = (flat if flat.dtype in (torch.float32, torch.float64) else flat.float()).square_()
    return torch.segment_reduce(squares, "sum", lengths=lengths, unsafe=True).sqrt()


def early_stop_reason(epoch: int, best_epoch: int, lr_now: float, peak_lr: float, hp,
                      passes_per_schedule_epoch: float = 1.0) -> str | None:
    """Why to stop after `epoch`, if it is time to; patience and warmup count epochs of the schedule, each
    `passes_per_schedule_epoch` passes over the training set (more than one on a small set)."""
    patience = math.ceil(hp.early_stopping_patience * passes_per_schedule_epoch - 1e-9)
    if epoch - best_epoch >= patience:
        return (f"no better model for {patience} epochs (early_stopping_patience={hp.early_stopping_patience}"
                + (f", of {passes_per_schedule_epoch:.3g} passes each on this small training set)"
                   if passes_per_schedule_epoch > 1 else ")"))
    if epoch > hp.warmup_epochs * passes_per_schedule_epoch and \
            lr_now <= peak_lr * hyperparameters.LR_EXHAUSTED * (1 + 1e-6):
        return (f"the learning rate has decayed to {lr_now:.3g}, 1/{1 / hyperparameters.LR_EXHAUSTED:.0f} "
                f"of its peak {peak_lr:.3g} or less, so further epochs would change little")
    return None


def balance_share(hp, train_channel, val_channel, held_out: bool) -> float:
    """How far the training loss's class weights go from the training set's own shares (0) toward every class
    counting the same (1, inverse frequency): balance_classes' true or false as set; auto asks which the validation
    images' class counts are likelier under, the training set's shares or equal ones, and takes the second's
    posterior chance (even odds before). A held-out validation set has the training set's shares by construction, and
    several labels an image keep theirs."""
    if hp.balance_classes != hyperparameters.AUTO:
        return float(hp.balance_classes)
    if held_out or train_channel.multi_label:
        return 0.0
    counts = torch.tensor(list(train_channel.images_per_class().values()), dtype=torch.float64).clamp(min=1)
    val_counts = torch.tensor(list(val_channel.images_per_class().values()), dtype=torch.float64)
    # log P(val counts | equal shares) - log P(val counts | the training shares); the multinomial's coefficient cancels
    log_odds = float((val_counts * (counts / counts.sum() * len(counts)).log().neg()).sum())
    return 1.0 / (1.0 + math.exp(-max(min(log_odds, 700.0), -700.0)))


def balance_text(channel, share: float) -> str:
    """What balance_share chose, for the log: the class weights it gives, and why."""
    if len(set(channel.images_per_class().values())) == 1:
        return "every class weighs 1 in the training loss (the training set is balanced)"
    weights = class_weights(channel, share)
    return (f"the training loss weighs the classes {float(weights.min()):.3g} to {float(weights.max()):.3g}, "
            f"{100 * share:.1f}% of the way from 1 to their inverse frequency: the chance that the validation "
            "images' class counts come from equal shares rather than the training set's")


def class_weights(channel, share: float = 1.0) -> torch.Tensor:
    """Each class's weight `share` of the way from 1 to its inverse frequency, normalised so that a balanced data set
    gets weights of 1."""
    counts = torch.tensor(list(channel.images_per_class().values()), dtype=torch.float)
    return 1.0 - share + share * counts.sum() / (len(counts) * counts.clamp(min=1))


def loss_function(channel, hp, balance: float) -> torch.nn.Module:
    """The training loss: cross-entropy with label smoothing, classes weighted `balance` of the way to counting the
    same (balance_share); for a multi-label channel, binary cross-entropy summed over the labels, positives weighted
    for balance_classes=true (multilabel.py; no smoothing: it would move every absent label's target off 0)."""
    if channel.multi_label:
        counts = torch.tensor(list(channel.images_per_class().values()), dtype=torch.float)
        return multilabel.loss_function(multilabel.positive_weights(counts, len(channel.samples))
                                        if balance else None)
    weights = class_weights(channel, balance)
    return torch.nn.CrossEntropyLoss(weight=None if bool((weights == 1).all()) else weights,
                                     label_smoothing=hp.smoothing)
