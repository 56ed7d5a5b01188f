"""attnlab: attention in convolutional networks, faithful to the papers and measured side by side."""
import os

# torch's CPU threads (GNU OpenMP) spin-wait at every barrier; on a shared 2-core machine that made 2-thread training
# 5-20x slower (measured). They sleep instead unless the user chose a policy. Effective only when attnlab is imported
# before torch, as the CLI always is.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import attention
from .errors import AttnlabError
from .models import create_model, list_models
from .models.attach import attach

__version__ = "0.1.0"
__all__ = ["attach", "attention", "create_model", "list_models", "AttnlabError", "__version__"]
