"""The fast tier: a few tests per package of ms_rm (and the parity side), for a contributor to run
per change (`python -m pytest -m fast -q`; how long it takes: docs/measurements.md). conftest.py
marks them; tests/test_layout.py checks that every package is here, that every entry names a test
that exists, and that none of them is marked slow. The whole suite stays what CI runs.

Picked from the suite's own durations (`--durations=0` of a full run): tests that exercise the
package's code paths, its errors included, on tiny inputs, without compiling a large graph.
"""

FAST_TIER = {
    "ms_rm.core": [
        "tests/test_ops.py::test_layer_norm_matches_torch",
        "tests/test_ops.py::test_attention_matches_sdpa",
        "tests/test_ops.py::test_timestep_frequencies_are_correctly_rounded_and_torchs_within_one_ulp",
        "tests/test_ops.py::test_written_out_ops_have_their_exact_derivative",
        "tests/test_config.py::test_the_shared_integer_and_number_checks_refuse_bools_and_non_finite_values",
        "tests/test_config.py::test_bad_scheduler_config",
    ],
    "ms_rm.io": [
        "tests/test_hardening.py::test_absurd_safetensors_headers_fail_fast_without_allocating",
        "tests/test_convert.py::test_unsupported_adapter_settings_are_refused",
        "tests/test_rm_training.py::test_state_dicts_written_without_torch_read_back_in_torch",
    ],
    "ms_rm.backbones": [
        "tests/test_config.py::test_release_config_parses",
        "tests/test_sd3_transformer.py::test_a_cut_needs_both_tap_lists",
        "tests/test_public_api.py::test_text_protocol_per_family",
    ],
    "ms_rm.vae": [
        "tests/test_vae.py::test_config_errors",
        "tests/test_vae.py::test_config_defaults",
        "tests/test_vae.py::test_missing_folder_and_files",
    ],
    "ms_rm.encoders": [
        "tests/test_prompts.py::test_import_needs_neither_mindone_nor_torch",
        "tests/test_t5.py::test_position_buckets_match_transformers",
    ],
    "ms_rm.rewards": [
        "tests/test_model.py::test_diffusion_rm_implements_the_reward_model_protocol",
    ],
    "ms_rm.rewards.diffusion_rm": [
        "tests/test_noise.py::test_table_equals_diffusers_bit_for_bit",
        "tests/test_noise.py::test_bad_u_is_refused",
        "tests/test_public_api.py::test_prepare_then_forward_is_reward",
    ],
    "ms_rm.rewards.aesthetic": [
        "tests/test_aesthetic.py::test_released_vit_l14_and_mlp_build_with_the_references_parameter_counts",
        "tests/test_aesthetic.py::test_a_wrong_pth_is_a_one_line_error_naming_its_keys",
    ],
    "ms_rm.rewards.clip": [
        "tests/test_clip.py::test_non_rgb_images_are_converted_as_clip_image_processor_does",
    ],
    "ms_rm.rewards.hpsv2": [
        "tests/test_hpsv2.py::test_unsupported_open_clip_configs_are_config_errors",
    ],
    "ms_rm.rewards.imagereward": [
        "tests/test_imagereward.py::test_config_round_trips_and_refuses_nonsense",
    ],
    "ms_rm.rewards.blip_score": [
        "tests/test_blip_score.py::test_config_round_trips_and_refuses_nonsense",
    ],
    "ms_rm.scoring": [
        "tests/test_jpeg.py::test_pil_images_of_every_mode_score_as_the_fork",
        "tests/test_images.py::test_crop_takes_the_centre_multiple_of_16",
        "tests/test_images.py::test_bad_pairs_files_say_where",
        "tests/test_scorers.py::test_normalization",
    ],
    "ms_rm.generators": [
        "tests/test_generator.py::test_schedule_is_set_timesteps_bit_for_bit",
    ],
    "ms_rm.search": [
        "tests/test_search.py::test_db1_transform_is_pywavelets_bit_for_bit",
        "tests/test_search.py::test_bad_search_input_is_refused",
    ],
    "ms_rm.flows": [
        "tests/test_flows.py::test_bad_flow_configs_name_the_key",
        "tests/test_flows.py::test_reference_params_take_the_reference_constructors_defaults",
    ],
    "ms_rm.training": [
        "tests/test_grpo.py::test_group_advantages_follow_the_per_prompt_formula",
        "tests/test_grpo.py::test_tracker_keeps_each_prompts_history_until_cleared",
        "tests/test_rm_training.py::test_adamw_equals_torch_adamw_after_clip_grad_norm",
        "tests/test_rm_training.py::test_losses_are_the_reference_formulas",
        "tests/test_rm_training.py::test_u_schemes_draw_their_distributions_and_refuse_bad_parameters",
    ],
    "ms_rm.integrations": [
        "tests/test_flow_grpo.py::test_not_importable_is_one_clear_error",
    ],
    "ms_rm.integrations.flow_grpo": [
        "tests/test_flow_grpo.py::test_errors_name_the_fix",
        "tests/test_flow_grpo.py::test_the_launcher_runs_a_trainer_script_unchanged",
    ],
    "ms_rm.evaluation": [
        "tests/test_evaluation.py::test_ranking_metrics_equal_the_upstream_functions",
        "tests/test_evaluation.py::test_pairwise_accuracy_and_interval_equal_a_direct_computation",
        "tests/test_evaluation.py::test_an_interrupted_or_extended_run_scores_nothing_twice",
        "tests/test_evaluation.py::test_bad_pairs_get_one_line_errors_naming_the_line",
    ],
    "ms_rm.cli": [
        "tests/test_cli_registry.py::test_help_lists_every_registered_model",
        "tests/test_cli_registry.py::test_bad_reward_names_are_one_line_errors",
    ],
    "ms_rm": [                                   # the package as a whole: its import rules, its docs
        "tests/test_layout.py::test_no_import_cycle_among_modules",
        "tests/test_layout.py::test_every_link_in_the_readme_and_the_guides_resolves",
    ],
    "ms_rm_parity": [
        "tests/test_parity.py::test_every_registered_reward_model_has_parity_cases",
    ],
}

FAST_TESTS = {test for tests in FAST_TIER.values() for test in tests}
