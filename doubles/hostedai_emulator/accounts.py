"""The emulated accounts: who may call the emulator, which regions and pools it offers, and at what
price.

An `EmulatorConfig` is one hosted·ai account as the API shows it: teams, each with its API key
(the emulator's own, for local use only), regions as the bare objects the API lists, and pools of
shared GPUs, each a number of GPUs times a sharing ratio of vGPUs at an hourly price, dedicated or
preemptible. Two fixtures: `default_config`, the account the packaged catalog was written against,
and `other_account_config`, the same teams on an account whose pools are named the way another
operator would name them, which is what the connector's pool matching meets on a real account.
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel, Field

from doubles.hostedai_emulator.faults import Faults


class TeamConfig(BaseModel):
    id: str
    name: str
    api_key: str


class PoolConfig(BaseModel):
    id: int
    pool_name: str
    pool_label: str
    gpu_model_type: str
    gpuaas_id: int
    gpus: int = Field(gt=0)
    sharing_ratio: int = Field(ge=1, le=10)
    price_per_vgpu_hour: float = Field(ge=0)
    preemptible: bool = False


class EmulatorConfig(BaseModel):
    teams: list[TeamConfig]
    regions: list[dict[str, Any]]
    pools: list[PoolConfig]
    faults: Faults = Faults()


def default_config() -> EmulatorConfig:
    """Three teams (the catalog's tenants), one region, two dedicated and two preemptible pools.
    The keys are the emulator's own, for local use only."""
    return EmulatorConfig(
        teams=[
            TeamConfig(id=str(uuid.UUID(int=i)), name=name, api_key=f"hai-emulator-{name}-key")
            for i, name in enumerate(("demo", "acme", "globex"), start=1)
        ],
        regions=[{"id": 1, "name": "eu-west", "gpuaas_id": 7}],
        pools=[
            PoolConfig(
                id=101,
                pool_name="h100-dedicated",
                pool_label="H100 dedicated",
                gpu_model_type="H100",
                gpuaas_id=7,
                gpus=1,
                sharing_ratio=4,
                price_per_vgpu_hour=0.90,
            ),
            PoolConfig(
                id=102,
                pool_name="a100-dedicated",
                pool_label="A100 dedicated",
                gpu_model_type="A100-80GB",
                gpuaas_id=7,
                gpus=1,
                sharing_ratio=4,
                price_per_vgpu_hour=0.55,
            ),
            PoolConfig(
                id=201,
                pool_name="l4-spot",
                pool_label="L4 spot",
                gpu_model_type="L4",
                gpuaas_id=7,
                gpus=2,
                sharing_ratio=4,
                price_per_vgpu_hour=0.12,
                preemptible=True,
            ),
            PoolConfig(
                id=202,
                pool_name="a10-spot",
                pool_label="A10 spot",
                gpu_model_type="A10",
                gpuaas_id=7,
                gpus=1,
                sharing_ratio=4,
                price_per_vgpu_hour=0.09,
                preemptible=True,
            ),
        ],
    )


def other_account_config() -> EmulatorConfig:
    """The default teams and region on an account whose pools nobody typed into the catalog:
    other names, labels that say the tier in other words, vendor-style GPU names, and a GPU the
    catalog has no card for."""
    base = default_config()
    return base.model_copy(
        update={
            "pools": [
                PoolConfig(
                    id=311,
                    pool_name="h100-sxm-ondemand",
                    pool_label="H100 80GB on-demand",
                    gpu_model_type="NVIDIA H100 80GB HBM3",
                    gpuaas_id=7,
                    gpus=1,
                    sharing_ratio=4,
                    price_per_vgpu_hour=1.10,
                ),
                PoolConfig(
                    id=312,
                    pool_name="a100-80g-eu",
                    pool_label="A100 reserved capacity",
                    gpu_model_type="NVIDIA A100 80GB PCIe",
                    gpuaas_id=7,
                    gpus=1,
                    sharing_ratio=4,
                    price_per_vgpu_hour=0.70,
                ),
                PoolConfig(
                    id=321,
                    pool_name="gpu-l4-interruptible",
                    pool_label="NVIDIA L4 (interruptible)",
                    gpu_model_type="NVIDIA L4",
                    gpuaas_id=7,
                    gpus=2,
                    sharing_ratio=4,
                    price_per_vgpu_hour=0.14,
                    preemptible=True,
                ),
                PoolConfig(
                    id=322,
                    pool_name="rtx-a10-community",
                    pool_label="A10 community cloud",
                    gpu_model_type="NVIDIA A10",
                    gpuaas_id=7,
                    gpus=1,
                    sharing_ratio=4,
                    price_per_vgpu_hour=0.10,
                    preemptible=True,
                ),
                PoolConfig(
                    id=329,
                    pool_name="b200-spot",
                    pool_label="B200 spot",
                    gpu_model_type="NVIDIA B200",
                    gpuaas_id=7,
                    gpus=1,
                    sharing_ratio=4,
                    price_per_vgpu_hour=0.05,
                    preemptible=True,
                ),
            ]
        }
    )
