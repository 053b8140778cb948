"""Instance descriptions through the two text encoders of a tiny SDXL-architecture pipeline."""

import torch

from ifadapter.text import encode_descriptions

CAPTIONS = ["a red striped circle", "a dog", "a very small blue dotted diamond on the left side"]


def test_descriptions_padded_to_the_longest_equal_the_77_position_encoding(components):
    """The features are read from the causal encoders at the description's own positions, so
    padding to the longest description must give what padding to CLIP's 77 positions gives."""
    tokenizers = [components["tokenizer"], components["tokenizer_2"]]
    encoders = [components["text_encoder"], components["text_encoder_2"]]
    layers = (-2, -1)
    words, word_mask, eot = encode_descriptions(tokenizers, encoders, CAPTIONS, layers)

    full_words, full_eot = [], []
    for tokenizer, encoder in zip(tokenizers, encoders, strict=True):
        ids = tokenizer(
            CAPTIONS, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        end = (ids == tokenizer.eos_token_id).int().argmax(1)
        with torch.no_grad():
            hidden = encoder(ids, output_hidden_states=True).hidden_states
        full_words.append(torch.stack([hidden[layer] for layer in layers], 1))
        full_eot.append(hidden[-2][torch.arange(len(CAPTIONS)), end])
    length = int(end.max()) + 1
    assert words.shape[2] == length < 77
    torch.testing.assert_close(words, torch.cat(full_words, -1)[:, :, :length])
    torch.testing.assert_close(eot, torch.cat(full_eot, -1))
    expected_mask = (torch.arange(length) > 0) & (torch.arange(length) < end[:, None])
    assert torch.equal(word_mask, expected_mask)
