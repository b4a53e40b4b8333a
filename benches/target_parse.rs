//! Destination parsing on the request path: sluice's `split_absolute` against parsing the
//! same absolute URI with `http::Uri` (the obvious alternative), in the same run.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use sluice::target::split_absolute;

const URIS: [&str; 3] = [
    "http://api.example.com/v1/chat/completions?stream=true",
    "https://API.Stripe.com:443/v1/charges",
    "http://[2001:db8::1]:8080/x",
];

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("absolute_uri");
    g.bench_function("sluice_split_absolute", |b| {
        b.iter(|| {
            for u in URIS {
                black_box(split_absolute(black_box(u)).is_ok());
            }
        })
    });
    g.bench_function("http_uri_parse", |b| {
        b.iter(|| {
            for u in URIS {
                black_box(http::Uri::try_from(black_box(u)).is_ok());
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
