"""Zero-shot scoring end to end with a randomly initialised tiny RWKV-CLIP (placeholder demo).

The bundled, trained default model and the processor are not in the package yet, so this builds a tiny
random model, embeds synthetic images and token ids, and prints the softmax over 100 x cosine similarity
exactly as zero-shot classification does. The scores are meaningless: this only exercises the API.
"""

import torch

from rwkv_clip_hf import RWKVCLIPConfig, RWKVCLIPModel


def main() -> None:
    torch.manual_seed(0)
    config = RWKVCLIPConfig(
        text_config={"hidden_size": 64, "head_size": 16, "num_hidden_layers": 2, "intermediate_size": 128},
        vision_config={"hidden_size": 64, "head_size": 16, "num_hidden_layers": 2, "intermediate_size": 128},
    )
    model = RWKVCLIPModel(config).eval()
    labels = ["label 0", "label 1", "label 2"]
    # [start] + a few arbitrary BPE ids + [end]; the real tokenizer arrives with the processor
    input_ids = torch.tensor([[49406, 320 + i, 1125, 49407] for i in range(len(labels))])
    images = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        image = torch.nn.functional.normalize(model.get_image_features(images).pooler_output, dim=-1)
        text = torch.nn.functional.normalize(model.get_text_features(input_ids).pooler_output, dim=-1)
        probs = (100.0 * image @ text.t()).softmax(dim=-1)
    print("RANDOM WEIGHTS - placeholder until the bundled model lands; scores are meaningless")
    for index, row in enumerate(probs):
        ranked = sorted(zip(labels, row.tolist()), key=lambda pair: -pair[1])
        print(f"image {index}: " + ", ".join(f"{label} {score:.3f}" for label, score in ranked))


if __name__ == "__main__":
    main()
