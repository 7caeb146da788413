"""The built-in full-size workloads written as plain PyTorch modules, from their papers and reference
code (torchvision's ResNet v1.5 and MobileNetV2, ViT-B/16, BERT-base, GPT-2 small, Llama), independently
of models/workloads.py's layer formulas, so that torch's own FLOP counter can check what dse prices.
Built on the meta device they cost no memory: a whole training step of LLaMA-7B runs in a second.

Attention is written out as its two products (q @ k^T, softmax, @ v), which is what dse prices (dense,
no causal saving)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# --- convolutional networks (torchvision's layouts) -------------------------------------------------


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: the stride on the 3x3 convolution."""

    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = 4 * width
        self.conv1, self.bn1 = nn.Conv2d(c_in, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, c_out, 1, bias=False), nn.BatchNorm2d(c_out)
        self.downsample = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                           if stride != 1 or c_in != c_out else None)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class Basic(nn.Module):
    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)
        self.downsample = (nn.Sequential(nn.Conv2d(c_in, width, 1, stride, bias=False), nn.BatchNorm2d(width))
                           if stride != 1 or c_in != width else None)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    def __init__(self, blocks: list[int], bottleneck: bool, classes: int = 1000) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        block = Bottleneck if bottleneck else Basic
        c_in, stages = 64, []
        for stage, (count, width) in enumerate(zip(blocks, (64, 128, 256, 512), strict=True)):
            layers = []
            for i in range(count):
                layers.append(block(c_in, width, 2 if stage and not i else 1))
                c_in = width * (4 if bottleneck else 1)
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(c_in, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = c_in * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(), nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """Sandler et al. 2018, Table 2 (t, c, n, s), as torchvision builds it."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6()]
        c_in = 32
        for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                           (6, 160, 3, 2), (6, 320, 1, 1)):
            for i in range(n):
                layers.append(InvertedResidual(c_in, c, s if i == 0 else 1, t))
                c_in = c
        layers += [nn.Conv2d(c_in, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(1280, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


# --- transformers -----------------------------------------------------------------------------------


def attend(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """Dense multi-head attention on (B, T, d) projections: scores, softmax, context."""
    b, t, d = q.shape
    q, k, v = (z.reshape(b, t, heads, -1).transpose(1, 2) for z in (q, k, v))
    p = (q @ k.transpose(-1, -2) / (d // heads) ** 0.5).softmax(-1)
    return (p @ v).transpose(1, 2).reshape(b, t, d)


class EncoderBlock(nn.Module):
    """A BERT / GPT-2 / ViT block: fused qkv projection, attention, output projection, a GELU MLP, two
    LayerNorms (pre- or post-norm makes no difference to the counts)."""

    def __init__(self, width: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc_in, self.fc_out = nn.Linear(width, ffn), nn.Linear(ffn, width)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, -1)
        x = x + self.out(attend(q, k, v, self.heads))
        return x + self.fc_out(F.gelu(self.fc_in(self.norm2(x))))


class Bert(nn.Module):
    """BERT-base (Devlin et al. 2019): 12 x 768, 12 heads, FFN 3072, pooler and a 2-class head on [CLS]."""

    def __init__(self, seq: int = 128) -> None:
        super().__init__()
        self.word, self.position = nn.Embedding(30522, 768), nn.Embedding(512, 768)
        self.token_type = nn.Embedding(2, 768)
        self.norm = nn.LayerNorm(768)
        self.blocks = nn.Sequential(*[EncoderBlock(768, 12, 3072) for _ in range(12)])
        self.pooler, self.classifier = nn.Linear(768, 768), nn.Linear(768, 2)
        self.seq = seq

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(self.seq, device=tokens.device)
        x = self.word(tokens) + self.position(positions) + self.token_type(torch.zeros_like(tokens))
        x = self.norm(x)
        return self.classifier(torch.tanh(self.pooler(self.blocks(x)[:, 0])))


class Gpt2(nn.Module):
    """GPT-2 small (Radford et al. 2019): 12 x 768, the LM head tied to the token embedding."""

    def __init__(self, seq: int = 1024) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(50257, 768), nn.Embedding(1024, 768)
        self.blocks = nn.Sequential(*[EncoderBlock(768, 12, 3072) for _ in range(12)])
        self.norm = nn.LayerNorm(768)
        self.seq = seq

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.wte(tokens) + self.wpe(torch.arange(self.seq, device=tokens.device))
        return F.linear(self.norm(self.blocks(x)), self.wte.weight)


class VisionTransformer(nn.Module):
    """ViT-B/16 (Dosovitskiy et al. 2021): a stride-16 patch convolution, a class token, 12 x 768 blocks,
    the head on the class token."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 768, 16, 16)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 768))
        self.pos_embed = nn.Parameter(torch.zeros(1, 197, 768))
        self.blocks = nn.Sequential(*[EncoderBlock(768, 12, 3072) for _ in range(12)])
        self.norm, self.head = nn.LayerNorm(768), nn.Linear(768, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


class RMSNorm(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class LlamaBlock(nn.Module):
    def __init__(self, width: int, heads: int, kv_heads: int, ffn: int) -> None:
        super().__init__()
        d_head = width // heads
        self.heads, self.repeat = heads, heads // kv_heads
        self.q, self.o = nn.Linear(width, width, bias=False), nn.Linear(width, width, bias=False)
        self.k = nn.Linear(width, kv_heads * d_head, bias=False)
        self.v = nn.Linear(width, kv_heads * d_head, bias=False)
        self.gate, self.up = nn.Linear(width, ffn, bias=False), nn.Linear(width, ffn, bias=False)
        self.down = nn.Linear(ffn, width, bias=False)
        self.attn_norm, self.mlp_norm = RMSNorm(width), RMSNorm(width)

    def forward(self, x: Tensor) -> Tensor:
        h = self.attn_norm(x)
        b, t, _ = h.shape
        k, v = (z.reshape(b, t, -1, x.shape[-1] // self.heads).repeat_interleave(self.repeat, 2).flatten(2)
                for z in (self.k(h), self.v(h)))
        x = x + self.o(attend(self.q(h), k, v, self.heads))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Llama(nn.Module):
    """A Llama decoder (Touvron et al. 2023): pre-RMSNorm, SwiGLU MLP, untied output head."""

    def __init__(self, blocks: int, width: int, heads: int, ffn: int, kv_heads: int | None = None,
                 vocab: int = 32000, seq: int = 2048) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, width)
        self.layers = nn.Sequential(*[LlamaBlock(width, heads, kv_heads or heads, ffn)
                                      for _ in range(blocks)])
        self.norm, self.lm_head = RMSNorm(width), nn.Linear(width, vocab, bias=False)
        self.seq = seq

    def forward(self, tokens: Tensor) -> Tensor:
        return self.lm_head(self.norm(self.layers(self.embed_tokens(tokens))))


def image(batch: int, device: str = "meta") -> Tensor:
    return torch.empty(batch, 3, 224, 224, device=device)


def tokens(batch: int, seq: int, device: str = "meta") -> Tensor:
    return torch.zeros(batch, seq, dtype=torch.int64, device=device)


REFERENCES = {  # workload name: (module factory, input for a batch)
    "resnet18": (lambda: ResNet([2, 2, 2, 2], bottleneck=False), image),
    "resnet50": (lambda: ResNet([3, 4, 6, 3], bottleneck=True), image),
    "mobilenetv2": (MobileNetV2, image),
    "vit-b16": (VisionTransformer, image),
    "bert-base": (Bert, lambda batch: tokens(batch, 128)),
    "gpt2-small": (Gpt2, lambda batch: tokens(batch, 1024)),
    "llama-7b": (lambda: Llama(32, 4096, 32, 11008), lambda batch: tokens(batch, 2048)),
}
"""Each full-size built-in workload as a torch module and its input (dse's default sizes)."""
