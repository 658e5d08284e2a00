"""The optimisation side of one run: model placement, loss, optimiser, schedule, data order.

:class:`Trainer` is the small trainer of the engine (MONAI's ``engines/trainer.py``): it is set
up once from a :class:`~busseg.engine.TrainConfig` and runs one optimiser step per batch
(:meth:`Trainer.train_step`). Adam (Kingma & Ba, ICLR 2015) with decoupled weight decay
(AdamW; Loshchilov & Hutter, ICLR 2019), linear warm-up then cosine decay of the learning rate
(:func:`busseg.engine.lr_lambda`), optional bfloat16 autocast, gradient clipping, L2-SP
(Li, Grandvalet & Davoine, ICML 2018), the class head's class-balanced cross-entropy and
simulated prompts for models with guidance channels. The loop (:mod:`busseg.engine.loop`)
decides when to step, validate and stop.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from busseg.engine.config import TrainConfig, lr_lambda
from busseg.engine.guidance import WithClass, prompt_simulator, with_guidance
from busseg.engine.hooks import FrozenEncoder, WeightAverage, distributed_model, make_sampler
from busseg.losses import build_loss


class Trainer:
    """Everything one optimiser step needs, set up once per run.

    Setting up moves the model to ``device`` (channels-last if ``cfg.channels_last``),
    freezes its encoder (``cfg.freeze_encoder``), wraps it for data-parallel training, and
    builds the loss, the optimiser, the weight average and the training loader, in that order
    (the order fixes what the seeded generators produce).

    Parameters
    ----------
    model : torch.nn.Module
        A model from :func:`busseg.models.build_model`, trained in place.
    train_set : Dataset
        Yields (image (1, h, w) float32, mask (1, h, w) float32 in {0, 1}); wrapped in
        :class:`~busseg.engine.guidance.WithClass` for models with a class head.
    cfg : TrainConfig
        The run's settings.
    device : torch.device
        Where to train.
    distributed : bool
        Data-parallel training (``torch.distributed`` initialised).
    rank, world : int
        This process's rank and the number of processes.

    Attributes
    ----------
    model, train_model, eval_model : torch.nn.Module
        The model, what the step runs (the ``DistributedDataParallel`` wrapper in a
        data-parallel run) and what is validated and saved (the weight average with
        ``cfg.ema_decay``).
    optimizer : torch.optim.AdamW
    scheduler : torch.optim.lr_scheduler.LambdaLR
    loader : torch.utils.data.DataLoader
    sampler : torch.utils.data.Sampler or None
        The loader's sampler (:func:`busseg.engine.hooks.make_sampler`).
    frozen : busseg.engine.hooks.FrozenEncoder
    ema : busseg.engine.hooks.WeightAverage or None
    steps_per_epoch, total, epochs : int
        Optimiser steps per pass over the loader, planned steps, planned epochs.
    """

    def __init__(self, model: torch.nn.Module, train_set: Dataset, cfg: TrainConfig,
                 device: torch.device, *, distributed: bool = False, rank: int = 0,
                 world: int = 1) -> None:
        self.cfg, self.device, self.model, self.distributed = cfg, device, model, distributed
        model.to(device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.frozen = FrozenEncoder(model, cfg.freeze_encoder)
        self.train_model = distributed_model(model, device) if distributed else model
        self.loss_fn = build_loss(cfg.loss)
        self.num_classes = int(getattr(model, "num_classes", 0))
        self.class_weights = None
        if self.num_classes:
            train_set = WithClass(train_set)
            weights = train_set.class_weights(self.num_classes)
            if weights is not None:
                self.class_weights = weights.to(device)
        self.train_set = train_set
        self.simulator = prompt_simulator(model, cfg.prompts)
        self.prompt_rng = np.random.default_rng(cfg.seed + 7919 * rank)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr,
                                           weight_decay=cfg.weight_decay)
        # L2-SP: the starting weights (those given, before any resume) the penalty pulls towards
        self.l2sp_anchor = ([(p, p.detach().clone()) for p in model.parameters()
                             if p.requires_grad] if cfg.l2sp_alpha > 0 else [])
        self.ema = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay is not None else None
        self.eval_model = self.ema.module if self.ema is not None else model
        g = torch.Generator().manual_seed(cfg.seed)  # the data order
        self.sampler = make_sampler(train_set, cfg, distributed, rank, world, g)
        self.loader = DataLoader(
            train_set, batch_size=cfg.batch_size, shuffle=self.sampler is None,
            sampler=self.sampler, generator=g if self.sampler is None else None,
            drop_last=len(train_set) // world > cfg.batch_size,
            num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
        )
        self.steps_per_epoch = max(1, len(self.loader))
        self.total = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps is not None:
            self.total = cfg.max_steps
        self.epochs = math.ceil(self.total / self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lr_lambda(cfg, self.total))
        self.use_amp = cfg.amp == "on" or (cfg.amp == "auto" and device.type == "cuda")

    @property
    def averaged(self):
        """The ``AveragedModel`` of the weight average (what ``last/`` saves), or None."""
        return self.ema.averaged if self.ema is not None else None

    def lr(self) -> float:
        """Return the current learning rate."""
        return float(self.optimizer.param_groups[0]["lr"])

    def begin_epoch(self, epoch: int) -> None:
        """Prepare an epoch: the data-parallel shard order, training mode."""
        if self.distributed:
            self.sampler.set_epoch(epoch)
        self.train_model.train()

    def train_step(self, x: torch.Tensor, y: torch.Tensor, extra: list) -> float:
        """Run one optimiser step on a batch and return its loss.

        Parameters
        ----------
        x : torch.Tensor
            (N, 1, h, w) float32 images.
        y : torch.Tensor
            (N, 1, h, w) float32 masks in {0, 1}.
        extra : list
            The batch's further items: ``[class index (N,)]`` for models with a class head.

        Returns
        -------
        float
            The step's loss (segmentation, class and L2-SP terms).
        """
        dev, cfg = self.device, self.cfg
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        prompted = torch.zeros(x.shape[0], dtype=torch.bool, device=dev)
        if self.simulator is not None:
            guidance, prompted = self.simulator(self.model, x, y, self.prompt_rng)
            x, prompted = with_guidance(x, guidance, self.model), prompted.to(dev)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self.frozen.before_forward()
        loss = self._loss(x, y, extra, prompted)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.after_step(self.model)
        return loss.item()

    def _loss(self, x, y, extra, prompted) -> torch.Tensor:
        cfg, num_classes = self.cfg, self.num_classes
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
            if num_classes:
                logits, class_logits = self.train_model(x, with_class=True)
            else:
                logits = self.train_model(x)
        loss = self.loss_fn(logits.float(), y)
        if num_classes and self.class_weights is not None and cfg.class_loss_weight > 0:
            target = extra[0].to(self.device)
            # pairs that got prompt guidance do not train the class head
            target = torch.where(prompted, torch.full_like(target, -1), target)
            if (target >= 0).any():
                loss = loss + cfg.class_loss_weight * torch.nn.functional.cross_entropy(
                    class_logits.float(), target, weight=self.class_weights, ignore_index=-1)
        if self.l2sp_anchor:
            loss = loss + 0.5 * cfg.l2sp_alpha * sum(
                (p - p0).pow(2).sum() for p, p0 in self.l2sp_anchor)
        return loss
