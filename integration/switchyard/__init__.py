"""switchyard: expert-parallel Mixture-of-Experts for Hugging Face models under DeepSpeed."""

from switchyard import parallel
from switchyard.config import MoEConfig, ParallelConfig
from switchyard.parallel import ProcessGroupManager

__version__ = "0.1.0"

__all__ = ["MoEConfig", "MoELayer", "ParallelConfig", "ProcessGroupManager", "parallel", "__version__"]


def __getattr__(name: str):
    # The MoE layer pulls in DeepSpeed; import it on first use so `import switchyard` stays light.
    if name == "MoELayer":
        from switchyard.moe.layer import MoELayer

        return MoELayer
    raise AttributeError(f"module 'switchyard' has no attribute {name!r}")
