"""Model construction: the project's own small nets plus any timm model, behind one `create_model`."""
from shared.models.registry import create_model, is_model, list_models, register_model

# Importing the modules registers their models.
from shared.models import cifar_resnet, cifar_vgg, digits, rednet, sized_timm, wide_resnet  # noqa: F401,E402

# The DearKD student is built from a StudentConfig, not by name: shared/models/dearkd_student.py.

__all__ = ["create_model", "is_model", "list_models", "register_model"]
