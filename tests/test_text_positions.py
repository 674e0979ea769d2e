"""The text tower's token states line up with the input positions (and its attention_mask), whatever the padding
side, while the tower itself runs on the original's normalised layout."""

import pytest
import torch

from rwkv_clip_hf import RWKVCLIPTextModel

from conftest import BOS, EOS, randomize_, tiny_config
from reference import original_ids, text_tower

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tower():
    return randomize_(RWKVCLIPTextModel(tiny_config().text_config).double().eval(), seed=5)


def test_left_padded_states_line_up_with_the_input(tower):
    config = tower.config
    captions = [[BOS, 5, 6, 7, EOS], [BOS, 9, EOS]]
    width = 8
    ids = torch.full((2, width), 3)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, caption in enumerate(captions):
        ids[row, width - len(caption) :] = torch.tensor(caption)
        mask[row, width - len(caption) :] = 1
    canonical = torch.tensor([original_ids(c, config.max_position_embeddings, EOS) for c in captions])
    tokens, pooled = text_tower(canonical, tower.state_dict(), config)  # float64 reference, original layout
    tokens = torch.stack(tokens)
    with torch.no_grad():
        out = tower(ids, attention_mask=mask, output_hidden_states=True)
    assert out.last_hidden_state.shape == (2, width, config.hidden_size)
    for row, caption in enumerate(captions):
        pads = width - len(caption)
        # each real token has its own state (the BOS state where the BOS is, at index `pads`) ...
        torch.testing.assert_close(
            out.last_hidden_state[row, pads:], tokens[row, : len(caption)], rtol=1e-10, atol=1e-10
        )
        # ... and the padding the states of the original's padding after the caption, in order
        torch.testing.assert_close(
            out.last_hidden_state[row, :pads], tokens[row, len(caption) : width], rtol=1e-10, atol=1e-10
        )
    torch.testing.assert_close(out.pooler_output, pooled, rtol=1e-10, atol=1e-10)
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    assert all(h.shape == (2, width, config.hidden_size) for h in out.hidden_states)
    # the last hidden state before the final LayerNorm: the same positions as last_hidden_state
    final = tower.final_layer_norm(out.hidden_states[-1])
    torch.testing.assert_close(final * mask[..., None], out.last_hidden_state * mask[..., None])


def test_return_dict_false_gives_the_aligned_tuple(tower):
    ids = torch.tensor([[0, 0, BOS, 4, EOS]])
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    with torch.no_grad():
        as_dict = tower(ids, attention_mask=mask)
        as_tuple = tower(ids, attention_mask=mask, return_dict=False)
    assert torch.equal(as_tuple[0], as_dict.last_hidden_state) and torch.equal(as_tuple[1], as_dict.pooler_output)
    assert as_tuple[0].shape[1] == 5
