"""CLIPSeg's forward pass, split so that the expensive part runs once per image.

``CLIPSegForImageSegmentation.forward`` runs the whole CLIP vision encoder (12 layers) for every
(image, prompt) pair. Only the layers in ``config.extract_layers`` feed the decoder, and none of
the vision work depends on the prompt. Here:

1. ``backbone``: embeddings and encoder layers up to the deepest extracted one, once per image;
2. ``reduce``: the decoder's per-token projections of those activations, once per image;
3. ``decode``: FiLM conditioning, the small decoder and the transposed convolution, once per
   (image, prompt) pair, all pairs of a batch (positives and negatives) in one call.

The arithmetic is the model's own modules applied in the model's own order, so the logits equal
the straightforward forward within float noise (tests/test_engine.py checks this).
"""

from __future__ import annotations

import math

import torch
from transformers import CLIPSegForImageSegmentation


class SplitCLIPSeg:
    """The three stages above over a loaded ``CLIPSegForImageSegmentation``."""

    def __init__(self, model: CLIPSegForImageSegmentation):
        self.vision = model.clip.vision_model
        self.text_features = model.clip.get_text_features
        self.decoder = model.decoder
        self.extract_layers = tuple(model.config.extract_layers)
        self.depth = max(self.extract_layers) + 1  # encoder layers actually needed

    def backbone(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """(N, 3, S, S) pixels -> activations of the extracted layers, in ``extract_layers`` order.

        Each is (N, tokens, hidden); the order is the config's, as the model's own forward uses it.
        """
        hidden = self.vision.embeddings(pixel_values, interpolate_pos_encoding=True)
        hidden = self.vision.pre_layrnorm(hidden)
        outputs = {}
        for index, layer in enumerate(self.vision.encoder.layers[: self.depth]):
            hidden = layer(hidden, None)
            if index in self.extract_layers:
                outputs[index] = hidden
        return [outputs[index] for index in self.extract_layers]

    def reduce(self, activations: list[torch.Tensor]) -> list[torch.Tensor]:
        """Project activations to the decoder width, deepest first (the decoder's order)."""
        return [reduce(act) for act, reduce in zip(activations[::-1], self.decoder.reduces)]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids -> conditional embeddings (prompts, projection_dim)."""
        return self.text_features(input_ids, attention_mask=attention_mask).pooler_output

    def decode(self, reduced: list[torch.Tensor], image_index: torch.Tensor, conditionals: torch.Tensor) -> torch.Tensor:
        """Logits (pairs, S', S') for pairs (``reduced[:, image_index[k]]``, ``conditionals[k]``)."""
        decoder = self.decoder
        output = None
        for i, (features, layer) in enumerate(zip(reduced, decoder.layers)):
            features = features.index_select(0, image_index)
            output = features if output is None else features + output
            if i == decoder.conditional_layer:
                scale = decoder.film_mul(conditionals).unsqueeze(1)
                shift = decoder.film_add(conditionals).unsqueeze(1)
                output = scale * output + shift
            output = layer(output, attention_mask=None)
        output = output[:, 1:, :].transpose(1, 2)  # drop the class token
        size = int(math.sqrt(output.shape[2]))
        output = output.reshape(output.shape[0], output.shape[1], size, size)
        return decoder.transposed_convolution(output).squeeze(1)
