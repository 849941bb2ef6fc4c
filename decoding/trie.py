"""A token trie over a document's sentences, as the model would emit them at the start of its answer.

Constrained Sentence Prefix Decoding may only follow paths of this trie, so whatever it produces is the start of a
sentence that exists in the document. A node *identifies* a sentence when every sentence through it has the same
token sequence (one sentence, or identical duplicates): decoding can stop there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class TrieNode:
    children: dict[int, int] = field(default_factory=dict)  # token id -> node index
    sentences: list[int] = field(default_factory=list)  # sentences whose token path passes through this node
    terminal: list[int] = field(default_factory=list)  # sentences whose token path ends here
    depth: int = 0


class SentenceTrie:
    """Immutable after construction. ``sentence_ids[i]`` is the token sequence of sentence ``offset + i``."""

    ROOT = 0

    def __init__(self, sentence_ids: Sequence[Sequence[int]], offset: int = 0):
        if not sentence_ids:
            raise ValueError("a SentenceTrie needs at least one sentence")
        self.offset = offset
        self.nodes: list[TrieNode] = [TrieNode()]
        self._end_node: list[int] = []
        for local, ids in enumerate(sentence_ids):
            if not ids:
                raise ValueError(f"sentence {offset + local} has no tokens")
            sid = offset + local
            node = self.ROOT
            self.nodes[node].sentences.append(sid)
            for tok in ids:
                nxt = self.nodes[node].children.get(tok)
                if nxt is None:
                    nxt = len(self.nodes)
                    self.nodes.append(TrieNode(depth=self.nodes[node].depth + 1))
                    self.nodes[node].children[tok] = nxt
                node = nxt
                self.nodes[node].sentences.append(sid)
            self.nodes[node].terminal.append(sid)
            self._end_node.append(node)
        # Children as tensors once, so the search gathers log-probs without Python loops over the vocabulary.
        self._child_tokens = [torch.tensor(list(n.children), dtype=torch.long) for n in self.nodes]

    def child_tokens(self, node: int) -> torch.Tensor:
        return self._child_tokens[node]

    def child(self, node: int, token: int) -> int:
        return self.nodes[node].children[token]

    def identified(self, node: int) -> tuple[int, ...] | None:
        """The sentence(s) this node pins down, or None while several different sentences remain."""
        sentences = self.nodes[node].sentences
        end = self._end_node[sentences[0] - self.offset]
        if all(self._end_node[s - self.offset] == end for s in sentences):
            return tuple(sentences)
        return None

    def __len__(self) -> int:
        return len(self.nodes)
