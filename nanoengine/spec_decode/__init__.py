"""Lesson 10: speculative decoding. Guess several tokens cheaply, check them all in one
forward pass of the real model, keep the longest run the model agrees with.

``proposer`` defines what a guesser gets and returns; ``ngram`` guesses by prompt lookup,
``draft_model`` with a smaller model; ``rejection`` turns the target's and the draft's
distributions into an exact accept/reject rule; ``verifier`` applies it to a step's
logits inside the model runner; ``stats`` counts what was proposed and accepted.
"""

from nanoengine.spec_decode.ngram import NgramProposer, propose_ngram
from nanoengine.spec_decode.proposer import Proposal, ProposalRequest, Proposer
from nanoengine.spec_decode.rejection import speculative_distributions
from nanoengine.spec_decode.stats import SpecDecodeStats

__all__ = [
    "NgramProposer", "Proposal", "ProposalRequest", "Proposer", "SpecDecodeStats", "propose_ngram",
    "speculative_distributions",
]
