"""What is trained: the end-to-end network, its batching, and the eGeMAPS baseline."""
