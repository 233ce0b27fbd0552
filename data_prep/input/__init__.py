"""What a job reads: input tables and folders as rows, input formats, class labels, which local files an input may name."""
