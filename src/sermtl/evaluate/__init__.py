"""The results, significance and health of a study: metrics, pooled tables, paired tests, comparisons."""
