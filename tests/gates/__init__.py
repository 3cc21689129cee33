class StoredLogProbs:
    """The reference's log-probs file (``reference.LogProbsReader``), held in memory: [W, T-1, V]."""

    def __init__(self, log_probs):
        self.log_probs, self.vocabulary = log_probs, log_probs.shape[2]

    def window(self, index):
        return self.log_probs[index].copy()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass
