"""Our own generation tests, standing in for transformers' tests/generation/test_utils.py (not in its sdist).

`GenerationTesterMixin` runs on a unittest.TestCase that also has transformers' `ModelTesterMixin`: it reads
`self.all_generative_model_classes` and `self.model_tester.prepare_config_and_inputs_for_common()`, as transformers'
mixin does. Each test checks `generate` against a plain forward pass or against another generation path that must
give the same tokens: greedy decoding against an argmax loop without cache, KV cache against no cache, static cache
against the dynamic one, continuing from a returned cache, inputs_embeds against input_ids, left padding, beam
search and sampling. With zero-computation experts switched on this is where the gating residual (carried between
MoE layers, not through the cache) and the per-call routing must stay consistent.
"""

import copy

import torch

MAX_NEW_TOKENS = 4
BATCH = 3  # rows of the tester's batch used for generation (generation is sequential: keep it small)


class GenerationTesterMixin:
    # Families whose forward depends on the other tokens of the same call (e.g. OpenMoE's expert capacity) do not
    # give identical tokens when the same text is processed in different chunks; they set this to False.
    chunking_invariant = True

    def _generation_inputs(self, model_class):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        config.eos_token_id = None  # every row generates exactly MAX_NEW_TOKENS tokens
        torch.manual_seed(0)
        model = model_class(config).eval()
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = config.pad_token_id
        input_ids = inputs["input_ids"][:BATCH]
        return model, input_ids

    def _generate(self, model, input_ids, **kwargs):
        kwargs = dict(max_new_tokens=MAX_NEW_TOKENS, do_sample=False) | kwargs
        with torch.no_grad():
            return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)

    def test_greedy_generate_matches_argmax_loop(self):
        for model_class in self.all_generative_model_classes:
            model, input_ids = self._generation_inputs(model_class)
            expected = input_ids
            with torch.no_grad():
                for _ in range(MAX_NEW_TOKENS):
                    logits = model(expected, use_cache=False).logits[:, -1]
                    expected = torch.cat([expected, logits.argmax(-1, keepdim=True)], dim=-1)
            self.assertTrue(torch.equal(self._generate(model, input_ids, use_cache=False), expected))
            if self.chunking_invariant:
                self.assertTrue(torch.equal(self._generate(model, input_ids, use_cache=True), expected))

    def test_greedy_generate_dict_outputs(self):
        for model_class in self.all_generative_model_classes:
            model, input_ids = self._generation_inputs(model_class)
            output = self._generate(model, input_ids, return_dict_in_generate=True, output_scores=True,
                                    output_logits=True, output_hidden_states=True)
            self.assertEqual(output.sequences.shape, (input_ids.shape[0], input_ids.shape[1] + MAX_NEW_TOKENS))
            self.assertEqual(len(output.scores), MAX_NEW_TOKENS)
            self.assertEqual(len(output.logits), MAX_NEW_TOKENS)
            vocab_size = model.config.vocab_size
            for scores, logits in zip(output.scores, output.logits):
                self.assertEqual(scores.shape, (input_ids.shape[0], vocab_size))
                self.assertEqual(logits.shape, (input_ids.shape[0], vocab_size))
            self.assertEqual(len(output.hidden_states), MAX_NEW_TOKENS)
            self.assertEqual(len(output.hidden_states[0]), model.config.num_hidden_layers + 1)
            new_tokens = torch.stack([logits.argmax(-1) for logits in output.logits], dim=-1)
            self.assertTrue(torch.equal(output.sequences[:, input_ids.shape[1]:], new_tokens))

    def test_generate_with_static_cache(self):
        if not self.chunking_invariant:
            self.skipTest("the forward depends on the other tokens of each call: decoding steps differ by design")
        for model_class in self.all_generative_model_classes:
            model, input_ids = self._generation_inputs(model_class)
            dynamic = self._generate(model, input_ids)
            static = self._generate(model, input_ids, cache_implementation="static")
            self.assertTrue(torch.equal(static, dynamic))

    def test_generate_continue_from_cache(self):
        if not self.chunking_invariant:
            self.skipTest("the forward depends on the other tokens of each call: decoding steps differ by design")
        for model_class in self.all_generative_model_classes:
            model, input_ids = self._generation_inputs(model_class)
            full = self._generate(model, input_ids, max_new_tokens=2 * MAX_NEW_TOKENS)
            first = self._generate(model, input_ids, return_dict_in_generate=True)
            cache = first.get("cache", first.get("past_key_values"))
            self.assertIsNotNone(cache)
            cache_argument = "cache" if "cache" in first else "past_key_values"
            continued = self._generate(model, first.sequences, **{cache_argument: copy.deepcopy(cache)})
            self.assertTrue(torch.equal(continued, full))

    def test_generate_from_inputs_embeds(self):
        for model_class in self.all_generative_model_classes:
            model, input_ids = self._generation_inputs(model_class)
            from_ids = self._generate(model, input_ids)
            embeds = model.get_input_embeddings()(input_ids)
            with torch.no_grad():
                from_embeds = model.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(input_ids),
                                             max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
            self.assertTrue(torch.equal(from_embeds, from_ids[:, input_ids.shape[1]:]))

    def test_left_padding_compatibility(self):
        if not self.chunking_invariant:
            self.skipTest("padding tokens take part in routing (expert capacity) in this family, as in its source")
        for model_class in self.all_generative_model_classes:
            model, input_ids = self._generation_inputs(model_class)
            pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
            n_pad = 3
            padded = torch.cat([torch.full((input_ids.shape[0], n_pad), pad), input_ids], dim=-1)
            mask = torch.cat([torch.zeros(input_ids.shape[0], n_pad, dtype=torch.long),
                              torch.ones_like(input_ids)], dim=-1)
            position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
            with torch.no_grad():
                expected = model(input_ids, attention_mask=torch.ones_like(input_ids)).logits[:, -1]
                actual = model(padded, attention_mask=mask, position_ids=position_ids).logits[:, -1]
            torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
            generated = self._generate(model, input_ids)
            with torch.no_grad():
                generated_padded = model.generate(padded, attention_mask=mask, max_new_tokens=MAX_NEW_TOKENS,
                                                  do_sample=False)
            self.assertTrue(torch.equal(generated_padded[:, n_pad:], generated))

    def test_sample_generate_is_reproducible(self):
        for model_class in self.all_generative_model_classes:
            model, input_ids = self._generation_inputs(model_class)
            outputs = []
            for _ in range(2):
                torch.manual_seed(7)
                outputs.append(self._generate(model, input_ids, do_sample=True, top_k=5, temperature=0.8))
            self.assertEqual(outputs[0].shape, (input_ids.shape[0], input_ids.shape[1] + MAX_NEW_TOKENS))
            self.assertTrue(torch.equal(outputs[0], outputs[1]))

    def test_beam_search_generate(self):
        for model_class in self.all_generative_model_classes:
            model, input_ids = self._generation_inputs(model_class)
            beams = self._generate(model, input_ids, num_beams=2, num_return_sequences=2, use_cache=False)
            self.assertEqual(beams.shape, (2 * input_ids.shape[0], input_ids.shape[1] + MAX_NEW_TOKENS))
            self.assertTrue(torch.equal(beams[::2, : input_ids.shape[1]], input_ids))
            if self.chunking_invariant:
                with_cache = self._generate(model, input_ids, num_beams=2, num_return_sequences=2, use_cache=True)
                self.assertTrue(torch.equal(with_cache, beams))
