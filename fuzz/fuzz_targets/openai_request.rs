//! The body of a `/v1/chat/completions` or `/v1/completions` request, as the socket hands it
//! over: parsed, checked against each endpoint and the server's `max_tokens`, and turned into
//! generation parameters with the defaults of a model whose config samples or does not.
#![no_main]

use std::sync::LazyLock;

use edgeflow::engine::GenaiConfig;
use edgeflow::serve::openai::{Endpoint, Request};
use libfuzzer_sys::fuzz_target;

/// `serve.max_tokens` of the example config.
const MAX_TOKENS: usize = 512;

/// The tiny fixture's config as shipped (greedy), and with `do_sample` (its defaults apply).
static MODELS: LazyLock<[GenaiConfig; 2]> = LazyLock::new(|| {
    let text = include_str!("../../tests/fixtures/models/phi3-tiny-gqa/genai_config.json");
    let greedy: GenaiConfig = serde_json::from_str(text).expect("the fixture parses");
    let mut sampling = greedy.clone();
    sampling.search.do_sample = true;
    sampling.search.temperature = 0.7;
    sampling.search.top_p = 0.9;
    [greedy, sampling]
});

fuzz_target!(|data: &[u8]| {
    for endpoint in [Endpoint::Chat, Endpoint::Completions] {
        let plan = Request::from_json(data).and_then(|r| r.into_plan(endpoint, MAX_TOKENS));
        let plan = match plan {
            Ok(plan) => plan,
            Err(e) => {
                // Every refusal is a client error with a JSON body.
                assert_eq!(e.status().as_u16(), 400, "{e:?}");
                serde_json::to_vec(&e.body()).expect("an error body serializes");
                continue;
            }
        };
        for model in MODELS.iter() {
            match plan.params(model, MAX_TOKENS) {
                Ok(params) => {
                    assert!((1..=MAX_TOKENS).contains(&params.max_new_tokens), "{params:?}");
                    assert!(params.stop.len() <= 4 && params.stop.iter().all(|s| !s.is_empty()), "{params:?}");
                    params.sampling.validate().expect("accepted parameters are valid");
                }
                Err(e) => assert_eq!(e.status().as_u16(), 400, "{e:?}"),
            }
        }
    }
});
