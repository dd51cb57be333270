"""Speech generation: the talker (Qwen2 LM + flow-matching head + aggregator + stop head) and its AudioVAE."""
