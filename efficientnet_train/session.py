"""The training state, in typed objects set where they are built: what `train.prepare` checked once per host (a
`Job`), what every epoch of one training process uses, made once (`set_up`, a `Session`), and what fine-tuning
trains with under one recipe (`fine_tuning`, a `FineTuning`), made again when the probe's measurements change the
recipe."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from . import distributed, hyperparameters, report
from .channels import Channel
from .data import (GrowingCrop, ImageDataset, ModelInput, TrainBatches, dataset_of, decode_side, eval_transform,
                   resolve_data_config, train_transform)
from .engine import data_loader, seed_everything
from .model import autocast_for, create_model, read_model_channel, set_regularisation
from .optimisation import (balance_share, balance_text, create_optimizer, create_schedule, loss_function,
                           schedule_epoch_updates, training_tools)
from .recipe import Recipe, mirrors_at_evaluation, recipe_for, training_size_config
from .resources import SlowDataWarning, data_loading_workers_for, describe, versions
from .sagemaker import SageMakerEnvironment

log = logging.getLogger("efficientnet_train")


@dataclass
class Job:
    """What `prepare` checked, once per host, before any training process starts."""
    hp: object  # hyperparameters.parse's namespace; batch_size and pretrained_path as the job resolved them
    ignored: list
    train_channel: Channel
    val_channel: Channel
    held_out: list | None  # the rows of held_out_validation.csv, where val was held out of train
    copies: list
    resumed: tuple | None  # (path, state) of the newest checkpoint
    startup: report.StartUp



@dataclass
class Session:
    """What every epoch of one process uses, made once by `set_up`."""
    hp: object
    rank: distributed.Rank
    classes: list
    train_channel: Channel
    device: torch.device
    autocast: object
    model: torch.nn.Module
    stepped: torch.nn.Module  # what a training step runs: the model, wrapped for DDP in a distributed job
    ema: object
    scaler: object
    loss_fn: torch.nn.Module
    probe_first: bool  # a new head is fitted as a linear probe first; a previous job's head for these labels is kept
    resolved_data_config: dict
    workers: int
    val_data: ImageDataset
    val_loader: torch.utils.data.DataLoader
    val_input: ModelInput
    slow_data: SlowDataWarning
    args: dict  # args.yml, filled in as the job learns more
    title: str


@dataclass(frozen=True)
class FineTuning:
    """What fine-tuning trains with under one recipe: the training images at its size and augmentation, the optimizer
    and its schedule. Made again, before any update, when the probe's measurements change the recipe."""
    recipe: Recipe
    data_config: dict
    train_data: ImageDataset
    train_loader: torch.utils.data.DataLoader
    train_input: ModelInput
    eval_hflip: bool
    lr: float
    optimizer: torch.optim.Optimizer
    scheduler: object
    schedule_epoch: int

    def record(self) -> dict:
        return {**self.recipe.record(), "effective_lr": self.lr, "effective_eval_hflip": self.eval_hflip,
                "data_config": self.data_config, "updates_per_epoch": len(self.train_loader),
                "schedule_epoch_updates": self.schedule_epoch,
                "crop_growth_updates": self.train_loader.batch_sampler.growth_updates}


def set_up(env: SageMakerEnvironment, job: Job, resuming: bool, rank: distributed.Rank) -> Session:
    """Everything every epoch needs, made once: the device, the model, the validation data, the loss and the
    weights' average, and the settings args.yml records."""
    hp, train_channel, val_channel = job.hp, job.train_channel, job.val_channel
    classes = train_channel.classes
    if rank.distributed:
        job.startup.done(f"starting training process {rank.rank + 1} of {rank.world_size}")
    seed_everything(hp.seed + rank.rank)  # other dropout and augmentation in each process
    device = torch.device("cuda", rank.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu" and rank.is_main:
        log.warning("No GPU found (torch.cuda.is_available() is False): training on the CPU, many times slower. "
                    "Choose a GPU instance type (ml.g5, ml.g6, ml.p3, ...) for more than a small test.")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed image sizes: cuDNN times its kernels once, keeps the fastest
    autocast, amp_dtype = autocast_for(device)
    start = None if resuming else read_model_channel(env.channel_dir("model"))
    # At the strongest dropout and drop-connect the recipe may choose: the probe's measurements may lower them.
    strongest = recipe_for(hp)
    model = create_model(hp.model, classes, hp.pretrained_path, strongest.drop, strongest.drop_connect,
                         start=start).to(device)
    job.startup.done(f"building the model on the {'GPU' if device.type == 'cuda' else 'CPU'}")
    data_config = resolve_data_config(model, hp.img_size, hp.eval_img_size)
    workers = data_loading_workers_for(hp, rank.per_host)
    val_data = dataset_of(val_channel, eval_transform(data_config), hp.max_unusable_fraction, workers,
                          decode_side(data_config, training=False))
    # Every rank a different share, each image exactly once (no padding): the summed counts are the val set's.
    val_share = torch.utils.data.Subset(val_data, range(rank.rank, len(val_data), rank.world_size))
    balance = balance_share(hp, train_channel, val_channel, job.held_out is not None)
    if hp.balance_classes == hyperparameters.AUTO and job.held_out is None and not train_channel.multi_label \
            and rank.is_main:
        log.info("Class balance (auto): %s", balance_text(train_channel, balance))
    loss_fn = loss_function(train_channel, hp, balance).to(device)
    ema, scaler = training_tools(model, hp, amp_dtype)
    args = {**vars(hp),
            "ignored_hyperparameters": job.ignored, "classes": classes, "num_classes": len(classes),
            "multi_label": train_channel.multi_label, "effective_balance_classes": round(balance, 4),
            "global_batch_size": hp.batch_size * rank.world_size,
            "checkpoint_dir": str(env.checkpoint_dir),
            "processes": rank.world_size, "effective_workers": workers, "device": describe(device),
            "precision": str(amp_dtype).replace("torch.", "") if amp_dtype else "float32",
            "train_images": len(train_channel.samples), "val_images": len(val_channel.samples),
            "train_images_per_class": train_channel.images_per_class(),
            "val_images_per_class": val_channel.images_per_class(),
            "skipped_files": {ch.name: ch.skipped_summary() for ch in (train_channel, val_channel)},
            "val_held_out_of_train": job.held_out is not None,
            "val_copies_of_train_images": {"count": len(job.copies), "first": [
                {"val": v, "train": t} for v, t in job.copies[:20]]},
            "training_job_name": env.training_job_name, "versions": versions()}
    return Session(
        hp=hp, rank=rank, classes=classes, train_channel=train_channel, device=device, autocast=autocast, model=model,
        # Gradients averaged over all processes after each backward; parameters start as rank 0's.
        stepped=torch.nn.parallel.DistributedDataParallel(model) if rank.distributed else model,
        ema=ema, scaler=scaler, loss_fn=loss_fn,
        probe_first=not resuming and (start is None or start[1]["labels"] != classes),
        resolved_data_config=data_config, workers=workers, val_data=val_data,
        val_loader=data_loader(val_share, workers, device, hp.seed + rank.rank, batch_size=hp.batch_size),
        val_input=ModelInput(data_config, device),
        slow_data=SlowDataWarning(workers, hp.workers, rank.per_host, device.type == "cuda", rank.is_main),
        args=args, title=f"{hp.model} on {len(classes)} classes, {env.training_job_name or 'local run'}")


def fine_tuning(s: Session, recipe: Recipe) -> FineTuning:
    """What fine-tuning trains with under `recipe`; sets the model's dropout and drop-connect to the recipe's."""
    hp, rank = s.hp, s.rank
    data_config = training_size_config(s.resolved_data_config, recipe)
    # The crops grow from evaluation's to the recipe's as the rate warms up (GrowingCrop), over the same updates.
    transform = GrowingCrop(train_transform(data_config, recipe.aa, recipe.hflip, recipe.crop_scale),
                            data_config["crop_pct"], data_config["crop_mode"])
    train_data = dataset_of(s.train_channel, transform, hp.max_unusable_fraction, s.workers,
                            decode_side(data_config, True, recipe.crop_scale))
    updates = TrainBatches.per_epoch(len(train_data), hp.batch_size, rank.world_size)
    schedule_epoch = schedule_epoch_updates(hp, updates)
    growth = math.ceil(hp.warmup_epochs * schedule_epoch) if transform.crop else 0
    train_loader = data_loader(train_data, s.workers, s.device, hp.seed + rank.rank,
                               batch_sampler=TrainBatches(len(train_data), hp.batch_size, hp.seed, rank.world_size,
                                                          rank.rank, growth_updates=growth))
    set_regularisation(s.model, recipe.drop, recipe.drop_connect)
    lr = hyperparameters.scaled_lr(recipe.lr, hp.batch_size, rank.world_size)
    optimizer = create_optimizer(s.model, hp, lr, recipe.opt)
    scheduler = create_schedule(optimizer, hp, updates, schedule_epoch)
    return FineTuning(recipe=recipe, data_config=data_config, train_data=train_data, train_loader=train_loader,
                      train_input=ModelInput(data_config, s.device, recipe.reprob, hp.remode),
                      # a model never (or seldom, by auto's choice) shown mirror images can't be asked about them
                      eval_hflip=hp.eval_hflip and mirrors_at_evaluation(hp, recipe),
                      lr=lr, optimizer=optimizer, scheduler=scheduler, schedule_epoch=schedule_epoch)


def trainables(s: Session, tuning: FineTuning) -> dict:
    """What a checkpoint saves and a resumed job loads in place."""
    return dict(model=s.model, ema=s.ema, scaler=s.scaler, optimizer=tuning.optimizer, scheduler=tuning.scheduler)

