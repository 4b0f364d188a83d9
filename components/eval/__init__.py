"""The eval stage: several models side by side on one suite (report, comparison figure, champion history).
The scoring itself (pass@k, greedy accuracy, validation loss) is `components.scoring`."""
