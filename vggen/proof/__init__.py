"""Proof: concrete evaluation of equations, the document's transcribed equations, and the checks that the derived ones equal them."""
