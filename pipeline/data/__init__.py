"""Where images come from: sources, decoding, channels and quantization, augmentation, the validation split."""
