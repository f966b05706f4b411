"""Weight sync: the one owner of "the engines serve the learner's weights", and one file per transport."""
