"""RemoteScheduler handed to PyTorch Lightning and to Hugging Face's Trainer, unchanged.

Each framework trains a tiny model twice, with torch's scheduler and with RemoteScheduler
served in process; the weights must be bit-identical. Skipped where the framework is not
installed (it is not a dependency of lrserve).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from lrserve.client import RemoteScheduler
from lrserve.service import create_app
from lrserve.service.settings import Settings
from starlette.testclient import TestClient

STEPS = 40
SPEC = {"type": "OneCycleLR", "max_lr": 0.05, "total_steps": STEPS}


@pytest.fixture
def api(tmp_path):
    with TestClient(create_app(Settings(db=f"sqlite:///{tmp_path}/t.db"))) as client:
        yield client


def dataset():
    gen = torch.Generator().manual_seed(3)
    return torch.utils.data.TensorDataset(
        torch.randn(STEPS * 4, 6, generator=gen), torch.randn(STEPS * 4, 1, generator=gen)
    )


def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


# -- PyTorch Lightning -------------------------------------------------------------------------


def lightning_fit(tmp_path, make_scheduler):
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net()

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": make_scheduler(opt), "interval": "step"}}

    module = Module()
    trainer = pl.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    loader = torch.utils.data.DataLoader(dataset(), batch_size=4)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="lightning")  # its advice about workers etc.
        warnings.filterwarnings("ignore", message=".*num_workers.*")
        trainer.fit(module, loader)
    return module.net


def test_lightning_takes_remote_scheduler_as_a_torch_scheduler(api, tmp_path):
    local = lightning_fit(
        tmp_path, lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=STEPS)
    )
    made = []

    def remote(opt):
        made.append(RemoteScheduler(opt, SPEC, run_id="lightning", http_client=api))
        return made[-1]

    served = lightning_fit(tmp_path, remote)
    assert made[0].last_epoch == STEPS
    made[0].close()
    assert same_weights(served, local)


# -- Hugging Face Trainer ----------------------------------------------------------------------


def hf_train(tmp_path, make_scheduler):
    import transformers

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net()

        def forward(self, x, labels):
            return {"loss": torch.nn.functional.mse_loss(self.net(x), labels)}

    def collate(rows):
        return {"x": torch.stack([r[0] for r in rows]), "labels": torch.stack([r[1] for r in rows])}

    model = Model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = make_scheduler(opt)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' own deprecation chatter
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=dataset(), data_collator=collate, optimizers=(opt, sched)
        )
        trainer.train()
    return model.net, sched


def test_hugging_face_trainer_takes_remote_scheduler(api, tmp_path):
    local, _ = hf_train(
        tmp_path, lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=STEPS)
    )
    served, sched = hf_train(tmp_path, lambda opt: RemoteScheduler(opt, SPEC, run_id="hf", http_client=api))
    assert sched.last_epoch == STEPS
    sched.close()
    assert same_weights(served, local)
