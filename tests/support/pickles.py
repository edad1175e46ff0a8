"""A pickle payload: what a malicious checkpoint carries (the loaders must refuse it unrun)."""
import os


class Payload:
    """Pickles as a call of os.system that touches ``marker``: if the file appears, the code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)
