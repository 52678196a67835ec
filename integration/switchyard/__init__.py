"""switchyard: expert-parallel Mixture-of-Experts for Hugging Face models under DeepSpeed."""

from switchyard import parallel
from switchyard.config import MoEConfig, ParallelConfig
from switchyard.parallel import ProcessGroupManager

__version__ = "0.1.0"

__all__ = ["MoEConfig", "ParallelConfig", "ProcessGroupManager", "parallel", "__version__"]
