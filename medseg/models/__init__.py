"""Segmentation networks behind one factory: ``create_model(name, spatial_dims=..., in_channels=..., num_classes=...)``.

Registered models (``list_models()``):

- ``unet``: nnU-Net-style U-Net (Ronneberger 2015, Isensee 2021), topology from the plan, optional deep supervision;
- ``deeplabv3``, ``deeplabv3plus``: dilated ResNet + ASPP (Chen 2017, 2018), 2D and 3D, anisotropic for thick slices;
- ``fcn``: FCN-8s/16s/32s baseline on the same encoder (Long 2015);
- ``segresnet``, ``unetr``, ``swinunetr``, ``attentionunet``: MONAI's networks, for comparison.

Contract (every registered medseg model):

- ``forward(x)`` maps ``(B, in_channels, *spatial)`` of any size to logits
  ``(B, num_classes, *spatial)`` (inputs are padded internally and cropped back);
- the U-Net in training mode with ``deep_supervision=True`` returns a list
  ``[full-resolution logits, 1/2-resolution, 1/4, ...]`` (one per decoder stage,
  lower ones of spatial size ``ceil(spatial / stride)``); in eval mode always a tensor.
  ``model.deep_supervision`` says whether it does (False for all other models);
- fine-tuning: ``encoder_parameter_names(model)`` / ``encoder_parameters(model)``
  give the encoder (to freeze or to train with a lower learning rate) and
  ``head_parameter_names(model)`` the classifier parameters, whose shapes depend
  on ``num_classes`` (re-initialise them when the label set changes). Both come
  from the class attributes ``ENCODER_PREFIXES`` and ``HEAD_PREFIXES``; a user
  model without them has no encoder and no head.

Add your own with the :func:`register_model` decorator. Submodules (and torch)
are imported on first use (and torch with them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from medseg._lazy import lazy_exports

if TYPE_CHECKING:
    from medseg.models.base import encoder_parameter_names, encoder_parameters, head_parameter_names
    from medseg.models.deeplab import DeepLabV3, DeepLabV3Plus
    from medseg.models.fcn import FCN
    from medseg.models.registry import create_model, create_model_from_plan, list_models, register_model
    from medseg.models.resnet import ResNetEncoder
    from medseg.models.unet import UNet
    from medseg.topology import fit_patch_to_topology, unet_topology

_EXPORTS = {
    "create_model": "medseg.models.registry",
    "create_model_from_plan": "medseg.models.registry",
    "list_models": "medseg.models.registry",
    "register_model": "medseg.models.registry",
    "encoder_parameter_names": "medseg.models.base",
    "encoder_parameters": "medseg.models.base",
    "head_parameter_names": "medseg.models.base",
    "unet_topology": "medseg.topology",
    "fit_patch_to_topology": "medseg.topology",
    "UNet": "medseg.models.unet",
    "DeepLabV3": "medseg.models.deeplab",
    "DeepLabV3Plus": "medseg.models.deeplab",
    "FCN": "medseg.models.fcn",
    "ResNetEncoder": "medseg.models.resnet",
}

__all__ = [
    "FCN",
    "DeepLabV3",
    "DeepLabV3Plus",
    "ResNetEncoder",
    "UNet",
    "create_model",
    "create_model_from_plan",
    "encoder_parameter_names",
    "encoder_parameters",
    "fit_patch_to_topology",
    "head_parameter_names",
    "list_models",
    "register_model",
    "unet_topology",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
