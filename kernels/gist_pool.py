"""Gist pooling (DESIGN §8.2): placeholder module, the kernel helper replaces this file."""
import torch


def gist_pool_ref(x, query, K):
    raise NotImplementedError


def gist_pool(x, query, K):
    raise NotImplementedError
