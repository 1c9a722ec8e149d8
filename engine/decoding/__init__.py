"""Decoding strategies beyond one token at a time: prompt-lookup drafting (prompt_lookup), beam search (beam_search:
the search itself; paged_beams: its beams as sequences of the paged engine) and best_of candidates (best_of)."""
