"""Training-step time of the Flamingo architecture in PyTorch eager: the peer of
`otter bench train-step`.

Builds open-flamingo's `Flamingo` (open-flamingo 2.0.1, the architecture Otter extends)
from locally constructed modules with random weights and the same dimensions as the
Otter config.json given: HF CLIPVisionModel (patch tokens without CLS, no post-LN, as
Otter/Flamingo use) and HF LlamaForCausalLM (eager attention, untied lm_head). Trainable
set as Otter: perceiver, gated cross-attention, input embeddings, lm_head. One step =
forward + HF loss + backward + clip_grad_norm_(1.0) + torch AdamW step + zero_grad.
Prints one line like the Rust side.
"""
import json, sys, time, types

# open_flamingo/__init__.py imports its factory, which needs open_clip (and a hub); the
# benchmark only uses the Flamingo class, so stand in an empty module for open_clip.
sys.modules.setdefault("open_clip", types.ModuleType("open_clip"))

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
from open_flamingo.src.flamingo import Flamingo
from open_flamingo.src.flamingo_lm import FlamingoLMMixin
from open_flamingo.src.utils import extend_instance


class PatchTokens(nn.Module):
    """open-flamingo takes `vision_encoder.visual` and calls it as `visual(x)[1]` for the
    patch tokens (open_clip's output_tokens convention)."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, x):
        return None, self.clip(pixel_values=x).last_hidden_state[:, 1:, :]


class VisualHolder(nn.Module):
    def __init__(self, visual):
        super().__init__()
        self.visual = visual


def main(cfg_path, batch, seq, steps, warmup):
    cfg = json.load(open(cfg_path))
    t, v = cfg["text_config"], cfg["vision_config"]
    torch.manual_seed(0)
    clip = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
        num_hidden_layers=v["num_hidden_layers"], num_attention_heads=v["num_attention_heads"],
        patch_size=v["patch_size"], image_size=v["image_size"], hidden_act="quick_gelu",
        attn_implementation="eager"))
    lm = LlamaForCausalLM(LlamaConfig(
        vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
        num_hidden_layers=t["num_hidden_layers"], num_attention_heads=t["num_attention_heads"],
        num_key_value_heads=t.get("num_key_value_heads", t["num_attention_heads"]),
        rms_norm_eps=t.get("rms_norm_eps", 1e-6), tie_word_embeddings=False, attn_implementation="eager"))
    extend_instance(lm, FlamingoLMMixin)
    lm.set_decoder_layers_attr_name("model.layers")
    vocab = t["vocab_size"]
    eoc, media = vocab - 4, vocab - 3
    model = Flamingo(VisualHolder(PatchTokens(clip)), lm, eoc_token_id=eoc, media_token_id=media,
                     vis_dim=v["hidden_size"], cross_attn_every_n_layers=cfg.get("cross_attn_every_n_layers", 4))
    model.requires_grad_(False)
    model.perceiver.requires_grad_(True)
    model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    model.lang_encoder.get_input_embeddings().requires_grad_(True)
    model.lang_encoder.get_output_embeddings().requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in params)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and "gated_cross_attn" in n
             and not any(s in n for s in ("ff_gate", "attn_gate", "norm", "bias"))]
    rest = [p for p in params if all(p is not d for d in decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=1e-5)

    torch.manual_seed(1)
    ids = torch.randint(0, eoc, (batch, seq))
    ids[:, 1] = media
    s = v["image_size"]
    vision_x = torch.randn(batch, 1, 1, 3, s, s)
    mask = torch.ones_like(ids)

    opt_time = [0.0]

    def step():
        loss = model(vision_x, ids, attention_mask=mask, labels=ids.clone()).loss
        loss.backward()
        t = time.perf_counter()  # clip + update + zero_grad, as the Rust side's `optimizer`
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)
        opt_time[0] += time.perf_counter() - t

    for _ in range(warmup):
        step()
    opt_time[0] = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    dt = (time.perf_counter() - t0) / steps
    print(f"python params={n_all} trainable={n_train} batch={batch} seq={seq} threads={torch.get_num_threads()} step_s={dt:.4f} opt_s={opt_time[0] / steps:.4f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
