"""U-Net family (see :mod:`segcore.model.unet`)."""

from segcore.model.unet import (UNet, build_model, check_input_size, count_params,
                                min_paper_side, valid_side_at_most)

__all__ = ["UNet", "build_model", "check_input_size", "count_params", "min_paper_side",
           "valid_side_at_most"]
