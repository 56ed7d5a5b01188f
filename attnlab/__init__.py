"""attnlab: attention in convolutional networks, faithful to the papers and measured side by side."""
from . import attention
from .errors import AttnlabError
from .models import create_model, list_models

__version__ = "0.1.0"
__all__ = ["attention", "create_model", "list_models", "AttnlabError", "__version__"]
