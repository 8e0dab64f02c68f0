"""The catalog: the GPUs and machine types Vertex AI prediction offers, where, and at what dated price (data)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

GB = 1_000_000_000
GiB = 1 << 30
MiB = 1 << 20

# ---------------------------------------------------------------------------------------------
# Machine catalog
# ---------------------------------------------------------------------------------------------

# Prices are approximate on-demand list prices for Vertex AI prediction in us-central1 (Compute
# Engine list price of the machine with its GPUs x Vertex's prediction uplift of about 1.15), recorded
# 2026-11 from cloud.google.com/vertex-ai/pricing and not re-checked since; other regions cost more.
# They rank shapes against each other; pass `prices={machine_type: usd_per_hour}` to use your own.
PRICES_AS_OF = (
    "approximate on-demand prices, us-central1, recorded 2026-11 from cloud.google.com/vertex-ai/pricing; "
    "override with prices={machine_type: usd_per_hour}"
)


@dataclass(frozen=True)
class Accelerator:
    """One GPU type as Vertex names it (AcceleratorType enum) and as the engines see it."""

    name: str
    memory_bytes: int  # what the CUDA driver reports as total: the base of gpu_memory_utilization
    compute_capability: float
    regions: tuple[str, ...]  # where Vertex prediction offers it: a reasonable subset, not exhaustive
    bf16: bool = True
    native_fp8: bool = False
    legacy: bool = False  # Turing/Volta: no bf16, no FlashAttention-2; left out of `hardware: auto`
    multihost: bool = False  # offered as multi-host (multihostGpuNodeCount) GPU serving

    @property
    def memory_gb(self) -> float:
        return self.memory_bytes / GB


_US_EU_ASIA = (
    "us-central1",
    "us-east1",
    "us-east4",
    "us-west1",
    "us-west4",
    "europe-west1",
    "europe-west4",
    "asia-northeast1",
    "asia-southeast1",
)

ACCELERATORS: dict[str, Accelerator] = {
    a.name: a
    for a in (
        Accelerator(
            "NVIDIA_L4",
            23_034 * MiB,
            8.9,
            _US_EU_ASIA
            + (
                "us-east5",
                "europe-west2",
                "europe-west3",
                "asia-east1",
                "asia-south1",
                "northamerica-northeast1",
                "me-west1",
            ),
            native_fp8=True,
        ),
        Accelerator(
            "NVIDIA_TESLA_T4", 15_360 * MiB, 7.5, _US_EU_ASIA + ("asia-east1", "asia-south1"), bf16=False, legacy=True
        ),
        Accelerator(
            "NVIDIA_TESLA_V100",
            16_160 * MiB,
            7.0,
            ("us-central1", "us-west1", "europe-west4", "asia-east1"),
            bf16=False,
            legacy=True,
        ),
        Accelerator(
            "NVIDIA_TESLA_A100",
            40_960 * MiB,
            8.0,
            (
                "us-central1",
                "us-east1",
                "us-west1",
                "us-west4",
                "europe-west4",
                "asia-northeast1",
                "asia-northeast3",
                "asia-southeast1",
                "me-west1",
            ),
        ),
        Accelerator(
            "NVIDIA_A100_80GB",
            81_920 * MiB,
            8.0,
            ("us-central1", "us-east4", "us-east5", "europe-west4", "asia-southeast1"),
        ),
        Accelerator(
            "NVIDIA_H100_80GB",
            81_559 * MiB,
            9.0,
            (
                "us-central1",
                "us-east4",
                "us-east5",
                "us-west1",
                "us-south1",
                "europe-west4",
                "asia-southeast1",
                "asia-northeast1",
            ),
            native_fp8=True,
            multihost=True,
        ),
        Accelerator(
            "NVIDIA_H100_MEGA_80GB",
            81_559 * MiB,
            9.0,
            ("us-central1", "us-east4", "us-east5", "europe-west4", "asia-southeast1"),
            native_fp8=True,
            multihost=True,
        ),
        Accelerator(
            "NVIDIA_H200_141GB",
            143_771 * MiB,
            9.0,
            ("us-central1", "us-east4", "us-east5", "us-south1", "europe-west1", "asia-south1"),
            native_fp8=True,
            multihost=True,
        ),
        Accelerator(
            "NVIDIA_B200",
            183_359 * MiB,
            10.0,
            ("us-central1", "us-east4", "us-west2", "europe-west4", "asia-southeast1"),
            native_fp8=True,
            multihost=True,
        ),
        Accelerator(
            "NVIDIA_RTX_PRO_6000",
            97_887 * MiB,
            12.0,
            ("us-central1", "us-east4", "europe-west4", "asia-southeast1"),
            native_fp8=True,
        ),
    )
}


@dataclass(frozen=True)
class MachineType:
    """A Vertex prediction machine type: its GPU, the GPU counts it takes, its size and price."""

    name: str
    accelerator: str
    counts: tuple[int, ...]
    vcpus: int
    memory_gb: float
    price: float  # USD/hour for the machine with its GPUs; for N1, the machine alone
    gpu_price: float = 0.0  # N1 only: USD/hour per attached GPU
    auto: bool = True  # considered by `hardware: auto`
    price_estimated: bool = False  # no list price recorded: an estimate, shapes using it are never auto-picked

    def price_for(self, count: int, prices: Mapping[str, float] | None = None) -> float:
        if prices and self.name in prices:
            return float(prices[self.name])
        return round(self.price + self.gpu_price * count, 4)


def _g2(vcpus: int, gpus: int, price: float) -> MachineType:
    return MachineType(f"g2-standard-{vcpus}", "NVIDIA_L4", (gpus,), vcpus, vcpus * 4, price)


MACHINE_TYPES: dict[str, MachineType] = {
    m.name: m
    for m in (
        _g2(4, 1, 0.8129),
        _g2(8, 1, 0.9817),
        _g2(12, 1, 1.1506),
        _g2(16, 1, 1.3193),
        _g2(24, 2, 2.3010),
        _g2(32, 1, 1.9946),
        _g2(48, 4, 4.6021),
        _g2(96, 8, 9.2041),
        MachineType("n1-standard-8", "NVIDIA_TESLA_T4", (1, 2), 8, 30, 0.4370, 0.4025),
        MachineType("n1-standard-16", "NVIDIA_TESLA_T4", (1, 2, 4), 16, 60, 0.8741, 0.4025),
        MachineType("n1-standard-32", "NVIDIA_TESLA_T4", (2, 4), 32, 120, 1.7481, 0.4025),
        MachineType("n1-highmem-8", "NVIDIA_TESLA_V100", (1,), 8, 52, 0.5442, 2.8520),
        MachineType("n1-highmem-16", "NVIDIA_TESLA_V100", (2,), 16, 104, 1.0884, 2.8520),
        MachineType("n1-highmem-32", "NVIDIA_TESLA_V100", (4,), 32, 208, 2.1768, 2.8520),
        MachineType("n1-highmem-64", "NVIDIA_TESLA_V100", (8,), 64, 416, 4.3536, 2.8520),
        MachineType("a2-highgpu-1g", "NVIDIA_TESLA_A100", (1,), 12, 85, 4.2243),
        MachineType("a2-highgpu-2g", "NVIDIA_TESLA_A100", (2,), 24, 170, 8.4486),
        MachineType("a2-highgpu-4g", "NVIDIA_TESLA_A100", (4,), 48, 340, 16.8973),
        MachineType("a2-highgpu-8g", "NVIDIA_TESLA_A100", (8,), 96, 680, 33.7946),
        MachineType("a2-megagpu-16g", "NVIDIA_TESLA_A100", (16,), 96, 1360, 64.1004),
        MachineType("a2-ultragpu-1g", "NVIDIA_A100_80GB", (1,), 12, 170, 5.8291),
        MachineType("a2-ultragpu-2g", "NVIDIA_A100_80GB", (2,), 24, 340, 11.6582),
        MachineType("a2-ultragpu-4g", "NVIDIA_A100_80GB", (4,), 48, 680, 23.3165),
        MachineType("a2-ultragpu-8g", "NVIDIA_A100_80GB", (8,), 96, 1360, 46.6330),
        MachineType("a3-highgpu-1g", "NVIDIA_H100_80GB", (1,), 26, 234, 12.7204),
        MachineType("a3-highgpu-2g", "NVIDIA_H100_80GB", (2,), 52, 468, 25.4408),
        MachineType("a3-highgpu-4g", "NVIDIA_H100_80GB", (4,), 104, 936, 50.8816),
        MachineType("a3-highgpu-8g", "NVIDIA_H100_80GB", (8,), 208, 1872, 101.4868),
        MachineType("a3-megagpu-8g", "NVIDIA_H100_MEGA_80GB", (8,), 208, 1872, 106.0, price_estimated=True),
        MachineType("a3-ultragpu-8g", "NVIDIA_H200_141GB", (8,), 224, 2952, 97.5, price_estimated=True),
        MachineType("a4-highgpu-8g", "NVIDIA_B200", (8,), 224, 3968, 130.0, auto=False, price_estimated=True),
        MachineType("g4-standard-48", "NVIDIA_RTX_PRO_6000", (1,), 48, 180, 5.2, auto=False, price_estimated=True),
        MachineType("g4-standard-96", "NVIDIA_RTX_PRO_6000", (2,), 96, 360, 10.4, auto=False, price_estimated=True),
        MachineType("g4-standard-192", "NVIDIA_RTX_PRO_6000", (4,), 192, 720, 20.8, auto=False, price_estimated=True),
        MachineType("g4-standard-384", "NVIDIA_RTX_PRO_6000", (8,), 384, 1440, 41.6, auto=False, price_estimated=True),
    )
}

# H200 and the A3 Mega have no recorded list price: their estimates rank them, flagged in the plan. They
# stay in `auto` because they are the only single-node home for BF16 405B-class models.
_AUTO_DESPITE_ESTIMATE = {"a3-megagpu-8g", "a3-ultragpu-8g"}

MAX_NODES = 4  # multi-host replicas considered by `auto` (pipeline parallel across nodes)


@dataclass(frozen=True)
class Shape:
    """One replica's hardware: machine type x GPUs per node x nodes."""

    machine_type: str
    accelerator_type: str
    accelerator_count: int
    node_count: int = 1

    @property
    def gpus(self) -> int:
        return self.accelerator_count * self.node_count

    def describe(self) -> str:
        base = f"{self.machine_type} ({self.accelerator_count} x {self.accelerator_type})"
        return base if self.node_count == 1 else f"{self.node_count} x {base}, multi-host"


def catalog_shapes(*, include_legacy: bool = False, auto_only: bool = True) -> list[Shape]:
    """Every single-node shape in the catalog (the candidates `hardware: auto` picks from)."""
    shapes = []
    for m in MACHINE_TYPES.values():
        acc = ACCELERATORS[m.accelerator]
        if auto_only and (not m.auto or (m.price_estimated and m.name not in _AUTO_DESPITE_ESTIMATE)):
            continue
        if acc.legacy and not include_legacy:
            continue
        shapes.extend(Shape(m.name, m.accelerator, c) for c in m.counts)
    return shapes


def shape_price(shape: Shape, prices: Mapping[str, float] | None = None) -> float:
    """USD/hour for one replica of `shape` (all its nodes)."""
    machine = MACHINE_TYPES.get(shape.machine_type)
    if machine is None:
        return float((prices or {}).get(shape.machine_type, 0.0)) * shape.node_count
    return round(machine.price_for(shape.accelerator_count, prices) * shape.node_count, 4)


# Machine types served in fewer regions than their GPU: Model Garden lists a3-highgpu-2g/4g only here
# (model_garden_deployment_tutorial.ipynb, vertex-ai-samples@cc0d791).
MACHINE_REGIONS: dict[str, tuple[str, ...]] = {
    "a3-highgpu-2g": ("us-west1", "asia-southeast1", "europe-west4"),
    "a3-highgpu-4g": ("us-west1", "asia-southeast1", "europe-west4"),
}


def offered_regions(machine_type: str, accelerator_type: str) -> tuple[str, ...] | None:
    """Regions where Vertex prediction offers the machine with its GPU; None when the catalog does not know."""
    acc = ACCELERATORS.get(accelerator_type)
    regions = acc.regions if acc else None
    if machine_type in MACHINE_REGIONS:
        regions = tuple(r for r in (regions or MACHINE_REGIONS[machine_type]) if r in MACHINE_REGIONS[machine_type])
    return regions


# Where the mirror step runs: sized by the weights (components/pipelines pick the branch at preflight).
def mirror_machine_for(weights_bytes: int, job_above_gb: float = 20.0) -> dict[str, Any]:
    """Keyword arguments for GCPC's create_custom_training_job_from_component that size the mirror step; up to
    `job_above_gb` (the config's model.mirror_job_above_gb) the pipeline's own step (e2-standard-4) mirrors.

    Network bandwidth is what matters: GCE egress scales with vCPUs (e2-standard-4 ~8 Gbps,
    n2-standard-8 16 Gbps, n2-standard-16 32 Gbps). Disk stays at the 100 GB default: nothing is staged.
    """
    gb = weights_bytes / 1e9
    if gb <= job_above_gb:
        machine, gbps = "e2-standard-4", 8
    elif gb <= 150:
        machine, gbps = "n2-standard-8", 16
    else:
        machine, gbps = "n2-standard-16", 32
    # Timeout: 4x the time at a quarter of line rate, at least an hour; a stuck job must not run a week.
    seconds = max(3600, int(4 * weights_bytes / (gbps / 8 * 1e9 / 4)))
    return {"machine_type": machine, "boot_disk_size_gb": 100, "timeout": f"{seconds}s"}


# ----------------------------------------------------------------------------- Cloud Run (target: cloud_run)


# Cloud Run GPUs: the planner's accelerator, the regions the services GPU page lists (asia-south1 / asia-south2
# by invitation only, so left out), and the Cloud Quotas ids (with and without zonal redundancy) they draw on.
# The RTX PRO 6000 regions come from the worker-pools GPU page (the services page does not list it yet).
@dataclass(frozen=True)
class RunGpu:
    accelerator: str
    regions: tuple[str, ...]
    quota: str  # + "PerProjectRegion" (zonal redundancy) or "NoZonalRedundancyPerProjectRegion"
    price_per_second: float  # USD, without zonal redundancy
    price_per_second_zonal: float  # USD, with zonal redundancy
    launch_stage: str = ""  # "" = GA
    # Quota units per GPU: the RTX PRO 6000 quotas count milli-GPUs (a reading of Cloud Run's quota page;
    # no Google page found that states either unit: unverified, and the strict choice, since reading a GPU count
    # as milli-GPUs refuses a deploy rather than letting one through that the API would refuse).
    quota_per_gpu: int = 1


RUN_GPUS: dict[str, RunGpu] = {
    "nvidia-l4": RunGpu(
        "NVIDIA_L4",
        ("us-central1", "us-east4", "europe-west1", "europe-west4", "asia-southeast1"),
        "NvidiaL4GpuAlloc",
        0.0001867,
        0.0002909,
    ),
    "nvidia-rtx-pro-6000": RunGpu(
        "NVIDIA_RTX_PRO_6000",
        ("us-central1", "europe-west4", "asia-southeast1"),
        "NvidiaRtxPro6000GpuAlloc",
        0.00055,
        0.00085,
        launch_stage="BETA",  # Preview on the services GPU page
        quota_per_gpu=1000,
    ),
}
# Tier 1, instance-based billing (the only billing GPU services take): cloud.google.com/run/pricing, read 2026-12.
# The L4 price without zonal redundancy ($0.67/h) matches two public 2025-26 write-ups; the zonal-redundancy price
# and both RTX PRO 6000 prices are unverified estimates.
RUN_CPU_PER_SECOND = 0.000018
RUN_GIB_PER_SECOND = 0.000002
RUN_PRICES_NOTE = (
    "Cloud Run Tier 1 instance-based prices as of 2026-12 (cloud.google.com/run/pricing): $0.000018/vCPU-s, "
    "$0.000002/GiB-s, L4 $0.0001867/s without zonal redundancy; L4 with zonal redundancy and RTX PRO 6000 "
    "unverified"
)


def instance_shape(gpu_type: str) -> dict[str, Any]:
    """A Cloud Run instance as a plan's shape fields: one GPU, one node (what the TGI flags are rendered for)."""
    return {
        "machine_type": f"cloud-run-{gpu_type}",
        "accelerator_type": RUN_GPUS[gpu_type].accelerator,
        "accelerator_count": 1,
        "node_count": 1,
    }
