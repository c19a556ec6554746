"""Beam search bookkeeping as transformers' ``_beam_search`` does it, in float32 numpy on the host.

The framework (MLX, ONNX Runtime) computes each step's log-probabilities, adds ``running_scores`` and
picks every input's best ``candidates`` continuations over all of its beams; this class decides which of
them keep running, which finish (scored with the length penalty), when the search is over, and returns
the finished sequences. Same tokens as transformers for the same scores.

    search = BeamSearch(batch, num_beams, max_new_tokens, eos_ids)
    for t in range(max_new_tokens):
        scores = (log_softmax(logits) + search.running_scores.reshape(-1, 1)).reshape(batch, -1)
        top = best search.candidates flat indices of each row of scores; vals = their scores
        step = search.step(t, vals, top, vocab_size)
        if step is None:
            break
        source, tokens = step      # reorder the cache rows by source; feed tokens next
    sequences = search.sequences(num_return_sequences)
"""

from typing import Optional, Sequence, Union

import numpy as np

NEG_INF_SCORE = -1.0e9  # transformers' beam bookkeeping value for "never pick this"


class BeamSearch:
    def __init__(self, batch: int, num_beams: int, max_new_tokens: int, eos_ids: Sequence[int],
                 length_penalty: float = 1.0, early_stopping: Union[bool, str] = False):
        B, nb = batch, num_beams
        self.batch, self.num_beams, self.max_new_tokens = B, nb, max_new_tokens
        self.eos_ids = list(eos_ids)
        self.length_penalty, self.early_stopping = length_penalty, early_stopping
        # enough candidates that num_beams stay alive when num_beams of them end in EOS
        self.candidates = K = max(2, 1 + len(self.eos_ids)) * nb
        f32 = np.float32
        self._neg = neg = f32(NEG_INF_SCORE)
        self.running_scores = np.zeros((B, nb), f32)
        self.running_scores[:, 1:] = neg  # only beam 0 expands at the first step: no duplicate beams
        self._running = np.zeros((B, nb, 0), np.int64)
        self._done = np.zeros((B, nb, max_new_tokens), np.int64)
        self._done_lens = np.zeros((B, nb), np.int64)
        self._done_scores = np.full((B, nb), neg, f32)
        self._done_flags = np.zeros((B, nb), bool)
        self._improvable = np.ones((B,), bool)  # transformers' is_early_stop_heuristic_unsatisfied
        self._top_mask = np.arange(K) < nb
        self._rows = np.arange(B)[:, None]

    def step(self, t: int, vals: np.ndarray, top: np.ndarray, vocab_size: int
             ) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """vals, top: (batch, candidates) scores and flat indices (beam * vocab_size + token) of each
        input's best candidates, in any order. Returns (source, tokens), both (batch * num_beams,): the
        cache row each surviving beam continues and the token it feeds next; None when the search is over."""
        f32, neg, nb, b_idx = np.float32, self._neg, self.num_beams, self._rows
        lp, max_new = self.length_penalty, self.max_new_tokens
        vals = np.asarray(vals, f32)
        order = np.argsort(-vals, axis=1, kind="stable")  # as topk: largest first
        vals, top = np.take_along_axis(vals, order, 1), np.take_along_axis(np.asarray(top), order, 1)
        beam, tok = top // vocab_size, top % vocab_size
        cand_seqs = np.concatenate([self._running[b_idx, beam], tok[..., None]], axis=-1)  # (B, K, t + 1)
        hits = np.isin(tok, self.eos_ids) | (t + 1 >= max_new)

        # the best num_beams candidates that did not just finish keep running
        run_vals = vals + hits.astype(f32) * neg
        keep = np.argsort(-run_vals, axis=1, kind="stable")[:, :nb]
        self.running_scores = np.take_along_axis(run_vals, keep, 1)
        self._running = cand_seqs[b_idx, keep]
        source = np.take_along_axis(beam, keep, 1) + b_idx * nb

        # finished candidates among the top num_beams join the finished set if they beat its worst
        just_done = hits & self._top_mask[None, :]
        done_vals = vals / f32((t + 1) ** lp)
        full = self._done_flags.all(axis=1, keepdims=True) & (self.early_stopping is True)
        done_vals = done_vals + full.astype(f32) * neg
        done_vals = done_vals + (~self._improvable[:, None]).astype(f32) * neg
        done_vals = done_vals + (~just_done).astype(f32) * neg
        merged_scores = np.concatenate([self._done_scores, done_vals], axis=1)
        pick = np.argsort(-merged_scores, axis=1, kind="stable")[:, :nb]
        padded = np.zeros((self.batch, self.candidates, max_new), np.int64)
        padded[:, :, :t + 1] = cand_seqs
        self._done = np.concatenate([self._done, padded], axis=1)[b_idx, pick]
        self._done_lens = np.take_along_axis(
            np.concatenate([self._done_lens, np.full((self.batch, self.candidates), t + 1)], axis=1), pick, 1)
        self._done_flags = np.take_along_axis(np.concatenate([self._done_flags, just_done], axis=1), pick, 1)
        self._done_scores = np.take_along_axis(merged_scores, pick, 1)

        # can a running beam still beat the worst finished one? (transformers' early-stop heuristic)
        best_len = max_new if self.early_stopping == "never" and lp > 0 else t + 1
        best_running = self.running_scores[:, :1] / f32(best_len ** lp)
        worst_done = np.where(self._done_flags, self._done_scores.min(axis=1, keepdims=True), neg)
        self._improvable &= (best_running > worst_done).any(axis=1)
        if (not self._improvable.any() or (self._done_flags.all() and self.early_stopping is True)
                or hits.all()):
            return None
        return source.reshape(-1), self._running[:, :, -1].reshape(-1)

    def sequences(self, num_return_sequences: int = 1) -> list[list[int]]:
        """The best num_return_sequences finished sequences of each input, best first, inputs in order."""
        return [self._done[b, j, :self._done_lens[b, j]].tolist()
                for b in range(self.batch) for j in range(num_return_sequences)]
