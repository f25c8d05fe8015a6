"""Pyramidal attention (DESIGN §8.3): placeholder module, the kernel helper replaces this file."""
import torch


def lod_attention_ref(x, query, K):
    raise NotImplementedError


def lod_attention(x, query, K):
    raise NotImplementedError
