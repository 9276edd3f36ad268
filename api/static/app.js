// shapfleet's web page: plain JavaScript over the JSON API, with the key in sessionStorage.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { key: sessionStorage.getItem("shapfleetKey"), images: [], segments: [], polling: null, jobId: null };

class ApiError extends Error {
  constructor(problem, status) {
    super(`${problem.title || status}: ${problem.detail || ""}`);
    this.problem = problem;
    this.status = status;
  }
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {}, { Authorization: `Bearer ${state.key}` });
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (!response.ok) {
    let problem;
    try { problem = await response.json(); } catch (e) { problem = { title: response.statusText, detail: "" }; }
    throw new ApiError(problem, response.status);
  }
  return response;
}

function showError(error) {
  const box = $("error");
  box.textContent = error instanceof ApiError ? error.message : String(error);
  box.hidden = false;
}

function clearError() { $("error").hidden = true; $("error").textContent = ""; }

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "text") node.textContent = value; else node.setAttribute(name, value);
  }
  children.forEach((child) => node.append(child));
  return node;
}

// -- sign in ---------------------------------------------------------------------------------------
async function signIn(key) {
  state.key = key;
  await api("/v1/jobs?limit=1");  // a wrong key answers 401 with a problem we show
  sessionStorage.setItem("shapfleetKey", key);
  $("signin").hidden = true;
  $("app").hidden = false;
  $("sign-out").hidden = false;
  await Promise.all([loadModels(), loadJobs()]);
}

$("signin-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  clearError();
  try { await signIn($("api-key").value.trim()); } catch (error) { showError(error); }
});

$("sign-out").addEventListener("click", () => { sessionStorage.removeItem("shapfleetKey"); location.reload(); });

// -- models, images, settings --------------------------------------------------------------------------
async function loadModels(selected) {
  const { models } = await (await api("/v1/models")).json();
  const select = $("model-select");
  select.replaceChildren(element("option", { value: "", text: "(upload one below)" }));
  for (const model of models) {
    const size = model.height ? `${model.height}x${model.width}` : "any size";
    select.append(element("option", { value: model.id, text: `${model.id.slice(0, 12)}… ${model.layout} ${size}, ${model.n_classes ?? "?"} classes` }));
  }
  // A model uploaded a moment ago may not be listed yet (the store's listing can lag its writes):
  // it is still the one the job uses, so it is shown and selected all the same.
  if (selected && !models.some((model) => model.id === selected)) {
    select.append(element("option", { value: selected, text: `${selected.slice(0, 12)}… (just uploaded)` }));
  }
  if (selected) select.value = selected;
}

// Each image may bring its own label map (.npy or a label PNG) instead of the segmenter.
function addImages(files) {
  for (const file of files) { state.images.push(file); state.segments.push(null); }
  $("image-list").replaceChildren(...state.images.map((f, index) => {
    const labels = element("input", { type: "file", accept: ".npy,.png", class: "segments-file",
                                      "data-index": String(index), title: "its own label map (optional)" });
    labels.addEventListener("change", (event) => { state.segments[index] = event.target.files[0] || null; });
    return element("li", {}, element("span", { text: `${f.name} (${f.size} bytes)` }),
                   element("label", { text: " segments " }, labels));
  }));
}

$("image-files").addEventListener("change", (event) => addImages(event.target.files));
const zone = $("drop-zone");
zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
zone.addEventListener("dragleave", () => zone.classList.remove("over"));
zone.addEventListener("drop", (event) => { event.preventDefault(); zone.classList.remove("over"); addImages(event.dataTransfer.files); });

function settingsFromForm() {
  const settings = { segmenter: $("segmenter").value, masker: $("masker").value, preprocess: $("preprocess").value,
                     seed: Number($("seed").value || 0) };
  if ($("segmenter").value === "slic") settings.n_segments = Number($("n-segments").value);
  const mode = $("class-mode").value, value = $("class-value").value.trim();
  if (mode === "top_k") settings.top_k = Number(value || 1);
  if (mode === "labels") settings.labels = value.split(",").filter((v) => v.trim()).map(Number);
  if (mode === "all") settings.all_classes = true;
  if ($("method").value === "partition") {
    // Owen values over pixel boxes: no superpixels, a budget of max_evals instead of nsamples.
    settings.method = "partition";
    delete settings.segmenter;
    delete settings.n_segments;
    if ($("max-evals").value) settings.max_evals = Number($("max-evals").value);
  } else {
    if ($("nsamples").value) settings.nsamples = Number($("nsamples").value);
    if ($("target-error").value) settings.target_error = Number($("target-error").value);
    if ($("estimator").value !== "auto") settings.estimator = $("estimator").value;
  }
  if ($("resize").value.trim()) settings.resize = $("resize").value.trim();
  if ($("center-crop").value.trim()) settings.center_crop = $("center-crop").value.trim();
  const names = $("class-names").value.split(",").map((n) => n.trim()).filter((n) => n);
  if (names.length) settings.class_names = names;
  return settings;
}

$("job-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  clearError();
  try {
    let modelId = $("model-select").value;
    const modelFile = $("model-file").files[0];
    if (modelFile) {
      const upload = new FormData();
      upload.append("model", modelFile);
      modelId = (await (await api("/v1/models", { method: "POST", body: upload })).json()).id;
      await loadModels(modelId);
      $("model-file").value = "";
    }
    if (!modelId) throw new Error("choose an uploaded model or upload one");
    const form = new FormData();
    form.append("model_id", modelId);
    form.append("settings", JSON.stringify(settingsFromForm()));
    state.images.forEach((file) => form.append("image", file));
    const labelled = state.segments.filter((file) => file).length;
    if (labelled && labelled !== state.images.length) {
      throw new Error("give a segments file for every image, or for none");
    }
    if (labelled) state.segments.forEach((file) => form.append("segments", file));
    const job = await (await api("/v1/jobs", { method: "POST", body: form })).json();
    watchJob(job.id);
  } catch (error) { showError(error); }
});

// -- a job's progress and results ------------------------------------------------------------------------
function watchJob(jobId) {
  state.jobId = jobId;
  clearTimeout(state.polling);
  $("results").replaceChildren();
  $("job").hidden = false;
  $("job-id").textContent = jobId;
  // Polls are chained (the next starts after this one ends), so two never overlap and a job's
  // results are shown once; a poll for a job no longer watched stops.
  const tick = async () => {
    if (state.jobId !== jobId) return;
    try {
      const job = await (await api(`/v1/jobs/${jobId}`)).json();
      if (state.jobId !== jobId) return;
      const p = job.progress;
      $("job-status").textContent = job.status;
      $("job-progress").value = p.fraction;
      let text = `${p.evaluations_done} / ${p.evaluations_total} evaluations, ${p.shards_done} / ${p.shards_total} shards`;
      if (p.precision) {
        // A target run: each image's precision after its last round against the target, and the ETA.
        text += "; " + p.precision.map((r) => {
          const target = r.target_error ?? r.target_std, kind = r.target_error !== undefined ? "error" : "std";
          const achieved = r.precision === null ? "?" : r.precision.toPrecision(3);
          return `image ${r.image}: ${kind} ${achieved} (target ${target}) after ${r.round_index + 1} round(s)`;
        }).join(", ");
        if (p.eta_seconds != null) text += `, about ${Math.ceil(p.eta_seconds)} s left`;
      }
      $("job-progress-text").textContent = text;
      if (["succeeded", "failed", "canceled"].includes(job.status)) {
        $("cancel").hidden = true;
        if (job.status === "failed") showError(new ApiError(job.error, job.error.status));
        if (job.status === "succeeded") await showResults(job);
        loadJobs();
        return;
      }
      $("cancel").hidden = false;
      state.polling = setTimeout(tick, 500);
    } catch (error) { showError(error); }
  };
  tick();
}

$("cancel").addEventListener("click", async () => {
  try { await api(`/v1/jobs/${state.jobId}/cancel`, { method: "POST" }); } catch (error) { showError(error); }
});

async function artifactBlob(jobId, name) {
  return (await api(`/v1/jobs/${jobId}/artifacts/${name}`)).blob();
}

async function download(jobId, name) {
  const blob = await artifactBlob(jobId, name);
  const link = element("a", { href: URL.createObjectURL(blob), download: name.replace("/", "-") });
  document.body.append(link);
  link.click();
  link.remove();
  return blob.size;
}

function downloadLinks(job, results) {
  const links = element("div", { class: "downloads" }, "Download: ");
  for (const result of results) {
    const link = element("a", { href: "#", "data-name": result.name, text: `${result.name} (${result.size} B)` });
    link.addEventListener("click", (event) => { event.preventDefault(); download(job.id, result.name).catch(showError); });
    links.append(link);
  }
  return links;
}

// A many-image job also has results for all its images together (image: null): the grid and the
// stacked attributions.npz.
async function showCollection(job, results) {
  const card = element("section", { class: "card result-card", "data-image": "all" });
  card.append(element("h2", { text: "All images" }));
  for (const result of results.filter((r) => r.name.endsWith(".png"))) {
    const image = element("img", { class: "summary", alt: result.name });
    image.src = URL.createObjectURL(await artifactBlob(job.id, result.name));
    card.append(image);
  }
  card.append(downloadLinks(job, results));
  $("results").append(card);
}

async function showResults(job) {
  const byImage = new Map();
  const collection = [];
  for (const result of job.results) {
    if (result.image === null) {
      collection.push(result);
      continue;
    }
    if (!byImage.has(result.image)) byImage.set(result.image, []);
    byImage.get(result.image).push(result);
  }
  if (collection.length) await showCollection(job, collection);
  for (const [index, results] of byImage) {
    const prefix = results[0].name.includes("/") ? `${index}/` : "";
    const doc = await (await api(`/v1/jobs/${job.id}/artifacts/${prefix}explanation.json`)).json();
    const card = element("section", { class: "card result-card", "data-image": String(index) });
    card.append(element("h2", { text: byImage.size > 1 ? `Image ${index}` : "Result" }));
    const row = element("div", { class: "result" });
    row.append(await hoverCanvas(job.id, prefix, doc));
    const table = element("table", { class: "classes" },
      element("thead", {}, element("tr", {}, element("th", { text: "class" }), element("th", { text: "name" }),
        element("th", { text: "probability" }), element("th", { text: "output" }))));
    const body = element("tbody");
    doc.summary.classes.forEach((c) => body.append(element("tr", {}, element("td", { text: c.class }),
      element("td", { text: c.name }), element("td", { text: c.probability.toFixed(4) }),
      element("td", { text: c.output.toFixed(4) }))));
    table.append(body);
    row.append(table);
    card.append(row);
    const pictures = element("div", { class: "result" });
    for (const result of results.filter((r) => r.name.endsWith(".png") && !r.name.endsWith("image.png"))) {
      const image = element("img", { class: result.name.endsWith("summary.png") ? "summary" : "overlay", alt: result.name });
      image.src = URL.createObjectURL(await artifactBlob(job.id, result.name));
      pictures.append(image);
    }
    card.append(pictures);
    card.append(downloadLinks(job, results));
    $("results").append(card);
  }
}

// The image, drawn large; hovering shows the superpixel's value and standard error for each class.
async function hoverCanvas(jobId, prefix, doc) {
  const bitmap = await createImageBitmap(await artifactBlob(jobId, `${prefix}image.png`));
  const scale = Math.max(1, Math.floor(320 / Math.max(doc.width, doc.height)));
  const canvas = element("canvas", { width: doc.width * scale, height: doc.height * scale, class: "hover" });
  const context = canvas.getContext("2d");
  context.imageSmoothingEnabled = false;
  const draw = (highlight) => {
    context.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    if (highlight === null) return;
    context.fillStyle = "rgba(255, 220, 0, 0.45)";
    for (let y = 0; y < doc.height; y++)
      for (let x = 0; x < doc.width; x++)
        if (doc.segments[y][x] === highlight) context.fillRect(x * scale, y * scale, scale, scale);
  };
  draw(null);
  let current = null;
  const tooltip = $("tooltip");
  canvas.addEventListener("mousemove", (event) => {
    const rect = canvas.getBoundingClientRect();
    const x = Math.min(doc.width - 1, Math.floor((event.clientX - rect.left) / scale));
    const y = Math.min(doc.height - 1, Math.floor((event.clientY - rect.top) / scale));
    const segment = doc.segments[y][x];
    if (segment !== current) { current = segment; draw(segment); }
    const lines = doc.class_names.map((name, k) => {
      const std = doc.std[segment][k];
      return `${name}: ${doc.values[segment][k].toFixed(5)}${std >= 0 ? ` ± ${std.toFixed(5)}` : ""}`;
    });
    tooltip.textContent = `superpixel ${segment}\n${lines.join("\n")}`;
    tooltip.style.left = `${event.clientX + 14}px`;
    tooltip.style.top = `${event.clientY + 14}px`;
    tooltip.hidden = false;
  });
  canvas.addEventListener("mouseleave", () => { tooltip.hidden = true; current = null; draw(null); });
  return canvas;
}

// -- the jobs list -----------------------------------------------------------------------------------------
async function loadJobs() {
  try {
    const { jobs } = await (await api("/v1/jobs?limit=20")).json();
    $("jobs-body").replaceChildren(...jobs.map((job) => {
      const row = element("tr", { "data-job": job.id }, element("td", { text: job.id }), element("td", { text: job.status }),
        element("td", { text: job.created_at }),
        element("td", { text: `${job.progress.evaluations_done}/${job.progress.evaluations_total}` }));
      row.addEventListener("click", () => watchJob(job.id));
      return row;
    }));
  } catch (error) { showError(error); }
}

$("refresh-jobs").addEventListener("click", loadJobs);

window.shapfleet = { download, api };  // for scripted checks
// Signing in with the stored key: only a key the API refuses is forgotten. A request that fails for any
// other reason (the API unreachable, or the page left while the request was in flight, which aborts it)
// keeps the key for the next load and shows what went wrong.
if (state.key) {
  signIn(state.key).catch((error) => {
    if (error instanceof ApiError && error.status === 401) sessionStorage.removeItem("shapfleetKey");
    if ($("app").hidden) $("signin").hidden = false;
    showError(error);
  });
}
